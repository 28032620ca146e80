//! The write-ahead audit journal: append-only, hash-chained, group-committed.

#![forbid(unsafe_code)]
