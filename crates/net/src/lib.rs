//! mTLS HTTP/1.1 serving and calling, shared by every nitrile service and the CLI.

#![forbid(unsafe_code)]
