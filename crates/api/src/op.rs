//! The closed set of admin operations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ResourceKind;

/// An operation name that is not one of the closed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation {0:?}; `nitrile token request --help` lists the operations")]
pub struct OpError(pub String);

/// Every admin operation that exists. There is no other.
///
/// None of them returns guest memory, disk contents or console output; the
/// host agent's reviewed list of what each does lives beside the API it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    /// Health, software versions, measurements and capacity of a host.
    HostDescribe,
    /// Stop placing new instances on a host.
    HostDrain,
    /// Allow placement on a drained host again.
    HostUndrain,
    /// Install a signed release on a host (the deployer only).
    HostUpdate,
    /// A quote of the host's TPM over its measured PCRs with the caller's
    /// nonce, the event log, and an attestation document (auditors and
    /// on-call operators).
    HostAttest,
    /// Power a host running the host image off (on-call operators).
    HostShutdown,
    /// Launch a microVM instance on a host.
    InstanceLaunch,
    /// Metadata of one instance.
    InstanceDescribe,
    /// Metadata of the instances on a host.
    InstanceList,
    /// Stop an instance.
    InstanceStop,
    /// Start a stopped instance.
    InstanceStart,
    /// Terminate an instance and crypto-erase its instance store.
    InstanceTerminate,
    /// Read the cell's audit log (auditors only).
    AuditRead,
    /// Create an encrypted volume whose data key the key service makes and
    /// wraps.
    VolumeCreate,
    /// Metadata of one volume.
    VolumeDescribe,
    /// Metadata of the volumes a host sees.
    VolumeList,
    /// Attach a volume to an instance on a host: the key service releases
    /// its data key, sealed to the VMM that serves it.
    VolumeAttach,
    /// Detach a volume from its instance; the VMM forgets its key.
    VolumeDetach,
    /// Delete a volume: the key service destroys its key record first
    /// (crypto-erase), then the host removes the ciphertext.
    VolumeDelete,
    /// Create a key-encryption key in the key service.
    KmsKeyCreate,
    /// Metadata of one key of the key service.
    KmsKeyDescribe,
    /// Metadata of the keys of the key service the caller may see.
    KmsKeyList,
    /// Disable a key: every new attach of a volume under it is refused.
    KmsKeyDisable,
    /// Enable a disabled key again.
    KmsKeyEnable,
    /// Schedule the destruction of a key and of every volume key under it.
    KmsKeyScheduleDeletion,
    /// Cancel a scheduled destruction; the key stays disabled.
    KmsKeyCancelDeletion,
    /// Give a host the cell's instance network: the other hosts' signed
    /// tunnel announcements and where each instance address lives
    /// (placement only; metadata, no customer content).
    NetworkUpdate,
    /// A customer runs an instance of its own through the placement
    /// service, which picks the host.
    CustomerInstanceRun,
    /// A customer reads the metadata of one of its instances.
    CustomerInstanceDescribe,
    /// A customer lists its instances.
    CustomerInstanceList,
    /// A customer stops one of its instances.
    CustomerInstanceStop,
    /// A customer starts one of its stopped instances.
    CustomerInstanceStart,
    /// A customer terminates one of its instances.
    CustomerInstanceTerminate,
    /// A customer imports a guest image into the cell's image store.
    CustomerImageImport,
    /// A customer reads the metadata of one of its images.
    CustomerImageDescribe,
    /// A customer lists its images.
    CustomerImageList,
    /// A customer deletes one of its images.
    CustomerImageDelete,
    /// `deployment.start`: roll a release out to the cell's hosts, in
    /// waves (the deployment service).
    DeploymentStart,
    /// `deployment.describe`: the rollout in progress or the last one.
    DeploymentDescribe,
    /// `deployment.abort`: stop the rollout in progress before its next
    /// host.
    DeploymentAbort,
}

impl Operation {
    /// Every operation, in a stable order.
    pub const ALL: [Operation; 40] = [
        Self::HostDescribe,
        Self::HostDrain,
        Self::HostUndrain,
        Self::HostUpdate,
        Self::HostAttest,
        Self::HostShutdown,
        Self::InstanceLaunch,
        Self::InstanceDescribe,
        Self::InstanceList,
        Self::InstanceStop,
        Self::InstanceStart,
        Self::InstanceTerminate,
        Self::AuditRead,
        Self::VolumeCreate,
        Self::VolumeDescribe,
        Self::VolumeList,
        Self::VolumeAttach,
        Self::VolumeDetach,
        Self::VolumeDelete,
        Self::KmsKeyCreate,
        Self::KmsKeyDescribe,
        Self::KmsKeyList,
        Self::KmsKeyDisable,
        Self::KmsKeyEnable,
        Self::KmsKeyScheduleDeletion,
        Self::KmsKeyCancelDeletion,
        Self::NetworkUpdate,
        Self::CustomerInstanceRun,
        Self::CustomerInstanceDescribe,
        Self::CustomerInstanceList,
        Self::CustomerInstanceStop,
        Self::CustomerInstanceStart,
        Self::CustomerInstanceTerminate,
        Self::CustomerImageImport,
        Self::CustomerImageDescribe,
        Self::CustomerImageList,
        Self::CustomerImageDelete,
        Self::DeploymentStart,
        Self::DeploymentDescribe,
        Self::DeploymentAbort,
    ];

    /// The operation's wire name, e.g. `host.describe`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostDescribe => "host.describe",
            Self::HostDrain => "host.drain",
            Self::HostUndrain => "host.undrain",
            Self::HostUpdate => "host.update",
            Self::HostAttest => "host.attest",
            Self::HostShutdown => "host.shutdown",
            Self::InstanceLaunch => "instance.launch",
            Self::InstanceDescribe => "instance.describe",
            Self::InstanceList => "instance.list",
            Self::InstanceStop => "instance.stop",
            Self::InstanceStart => "instance.start",
            Self::InstanceTerminate => "instance.terminate",
            Self::AuditRead => "audit.read",
            Self::VolumeCreate => "volume.create",
            Self::VolumeDescribe => "volume.describe",
            Self::VolumeList => "volume.list",
            Self::VolumeAttach => "volume.attach",
            Self::VolumeDetach => "volume.detach",
            Self::VolumeDelete => "volume.delete",
            Self::KmsKeyCreate => "kms-key.create",
            Self::KmsKeyDescribe => "kms-key.describe",
            Self::KmsKeyList => "kms-key.list",
            Self::KmsKeyDisable => "kms-key.disable",
            Self::KmsKeyEnable => "kms-key.enable",
            Self::KmsKeyScheduleDeletion => "kms-key.schedule-deletion",
            Self::KmsKeyCancelDeletion => "kms-key.cancel-deletion",
            Self::NetworkUpdate => "network.update",
            Self::CustomerInstanceRun => "customer-instance.run",
            Self::CustomerInstanceDescribe => "customer-instance.describe",
            Self::CustomerInstanceList => "customer-instance.list",
            Self::CustomerInstanceStop => "customer-instance.stop",
            Self::CustomerInstanceStart => "customer-instance.start",
            Self::CustomerInstanceTerminate => "customer-instance.terminate",
            Self::CustomerImageImport => "customer-image.import",
            Self::CustomerImageDescribe => "customer-image.describe",
            Self::CustomerImageList => "customer-image.list",
            Self::CustomerImageDelete => "customer-image.delete",
            Self::DeploymentStart => "deployment.start",
            Self::DeploymentDescribe => "deployment.describe",
            Self::DeploymentAbort => "deployment.abort",
        }
    }

    /// Whether the operation changes state. Tokens for mutating operations are
    /// single-use: the host keeps their ids until they expire.
    pub fn is_mutation(self) -> bool {
        match self {
            Self::HostDescribe
            | Self::HostAttest
            | Self::InstanceDescribe
            | Self::InstanceList
            | Self::AuditRead
            | Self::VolumeDescribe
            | Self::VolumeList
            | Self::KmsKeyDescribe
            | Self::KmsKeyList
            | Self::CustomerInstanceDescribe
            | Self::CustomerInstanceList
            | Self::CustomerImageDescribe
            | Self::CustomerImageList
            | Self::DeploymentDescribe => false,
            Self::HostDrain
            | Self::HostUndrain
            | Self::HostUpdate
            | Self::HostShutdown
            | Self::InstanceLaunch
            | Self::InstanceStop
            | Self::InstanceStart
            | Self::InstanceTerminate
            | Self::VolumeCreate
            | Self::VolumeAttach
            | Self::VolumeDetach
            | Self::VolumeDelete
            | Self::KmsKeyCreate
            | Self::KmsKeyDisable
            | Self::KmsKeyEnable
            | Self::KmsKeyScheduleDeletion
            | Self::KmsKeyCancelDeletion
            | Self::NetworkUpdate
            | Self::CustomerInstanceRun
            | Self::CustomerInstanceStop
            | Self::CustomerInstanceStart
            | Self::CustomerInstanceTerminate
            | Self::CustomerImageImport
            | Self::CustomerImageDelete
            | Self::DeploymentStart
            | Self::DeploymentAbort => true,
        }
    }

    /// The kind of resource the operation names: launching and listing name the
    /// host they act on; the other instance and volume operations name the
    /// instance or volume; listing the key service's keys names the key
    /// service (`kms/<cell>`), the other key operations name the key. A
    /// customer's operations on the placement service name its instance
    /// (`instance/<customer>--<name>`) or image
    /// (`image/<customer>--<24 hex of the digest>`); its lists name the
    /// placement service (`placement/<cell>`).
    pub fn resource_kind(self) -> ResourceKind {
        match self {
            Self::HostDescribe
            | Self::HostDrain
            | Self::HostUndrain
            | Self::HostUpdate
            | Self::HostAttest
            | Self::HostShutdown
            | Self::InstanceLaunch
            | Self::InstanceList
            | Self::VolumeList
            | Self::NetworkUpdate => ResourceKind::Host,
            Self::InstanceDescribe
            | Self::InstanceStop
            | Self::InstanceStart
            | Self::InstanceTerminate => ResourceKind::Instance,
            Self::AuditRead => ResourceKind::Log,
            Self::VolumeCreate
            | Self::VolumeDescribe
            | Self::VolumeAttach
            | Self::VolumeDetach
            | Self::VolumeDelete => ResourceKind::Volume,
            Self::KmsKeyCreate
            | Self::KmsKeyDescribe
            | Self::KmsKeyDisable
            | Self::KmsKeyEnable
            | Self::KmsKeyScheduleDeletion
            | Self::KmsKeyCancelDeletion => ResourceKind::KmsKey,
            Self::KmsKeyList => ResourceKind::Kms,
            Self::CustomerInstanceRun
            | Self::CustomerInstanceDescribe
            | Self::CustomerInstanceStop
            | Self::CustomerInstanceStart
            | Self::CustomerInstanceTerminate => ResourceKind::Instance,
            Self::CustomerImageImport | Self::CustomerImageDescribe | Self::CustomerImageDelete => {
                ResourceKind::Image
            }
            Self::CustomerInstanceList | Self::CustomerImageList => ResourceKind::Placement,
            Self::DeploymentStart | Self::DeploymentDescribe | Self::DeploymentAbort => {
                ResourceKind::Deployment
            }
        }
    }

    /// Whether the operation is a customer's, served by the placement
    /// service (audience `placement`) and never by a host.
    pub fn is_customer(self) -> bool {
        matches!(
            self,
            Self::CustomerInstanceRun
                | Self::CustomerInstanceDescribe
                | Self::CustomerInstanceList
                | Self::CustomerInstanceStop
                | Self::CustomerInstanceStart
                | Self::CustomerInstanceTerminate
                | Self::CustomerImageImport
                | Self::CustomerImageDescribe
                | Self::CustomerImageList
                | Self::CustomerImageDelete
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = OpError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| OpError(s.chars().take(80).collect()))
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for op in Operation::ALL {
            assert_eq!(op.as_str().parse::<Operation>().unwrap(), op);
            assert!(seen.insert(op.as_str()));
        }
        assert!("host.shell".parse::<Operation>().is_err());
        assert!("HOST.DESCRIBE".parse::<Operation>().is_err());
    }

    #[test]
    fn reads_are_not_mutations() {
        assert!(!Operation::HostDescribe.is_mutation());
        assert!(Operation::InstanceTerminate.is_mutation());
        assert!(!Operation::CustomerInstanceList.is_mutation());
        assert!(Operation::CustomerImageImport.is_mutation());
    }

    #[test]
    fn customer_operations_are_apart_from_host_operations() {
        for op in Operation::ALL {
            assert_eq!(
                op.is_customer(),
                op.as_str().starts_with("customer-"),
                "{op}"
            );
        }
        assert_eq!(
            Operation::ALL.iter().filter(|o| o.is_customer()).count(),
            10
        );
    }
}
