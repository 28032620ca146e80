//! One module per noun of the CLI.

pub(crate) mod audit;
pub(crate) mod auditlog;
pub(crate) mod completion;
pub(crate) mod config;
pub(crate) mod customer;
pub(crate) mod deploy;
pub(crate) mod deployd;
pub(crate) mod entitlements;
pub(crate) mod host;
pub(crate) mod hostd;
pub(crate) mod image;
pub(crate) mod instance;
pub(crate) mod kms;
pub(crate) mod kmskey;
pub(crate) mod logd;
pub(crate) mod pki;
pub(crate) mod placed;
pub(crate) mod qemu_launch;
pub(crate) mod release;
pub(crate) mod token;
pub(crate) mod tokend;
pub(crate) mod up;
pub(crate) mod vmm;
pub(crate) mod volume;
pub(crate) mod witness;
