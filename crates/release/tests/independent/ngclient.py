"""python-tuf's ngclient against a nitrile release repository.

Serves REPO over HTTP on a free loopback port, trusts ROOT, refreshes the
metadata and downloads TARGET into WORKDIR/downloads. Prints
"OK <path>" and exits 0, or "REFUSED <error>" and exits 2 when the client
refuses the repository or the target, or "NO-TARGET" and exits 3.

    python3 ngclient.py REPO ROOT WORKDIR TARGET
"""

import functools
import http.server
import os
import shutil
import sys
import threading

from tuf.ngclient import Updater


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    repo, root, workdir, target = sys.argv[1:5]
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=repo)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = "http://127.0.0.1:%d" % server.server_address[1]
    metadata = os.path.join(workdir, "metadata")
    downloads = os.path.join(workdir, "downloads")
    os.makedirs(metadata, exist_ok=True)
    os.makedirs(downloads, exist_ok=True)
    shutil.copy(root, os.path.join(metadata, "root.json"))
    with open(root, "rb") as f:
        trusted_root = f.read()
    try:
        updater = Updater(
            metadata_dir=metadata,
            bootstrap=trusted_root,
            metadata_base_url=base + "/metadata/",
            target_dir=downloads,
            target_base_url=base + "/targets/",
        )
        updater.refresh()
        info = updater.get_targetinfo(target)
        if info is None:
            print("NO-TARGET")
            return 3
        path = updater.download_target(info)
        print("OK", path)
        return 0
    except Exception as e:  # every refusal of the client
        print("REFUSED", type(e).__name__, e)
        return 2
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
