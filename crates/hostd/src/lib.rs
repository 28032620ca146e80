//! The host agent: admission of admin requests (token verification and journaling).

#![forbid(unsafe_code)]
