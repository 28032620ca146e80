//! PASETO v4.public admin tokens: claims, issuing, offline verification and replay cache.

#![forbid(unsafe_code)]
