//! The kernel side: loading and attaching the programs, the offsets they
//! are given at start-up, decoding their ring records, and the privileges
//! that needs.

pub mod check;
pub mod decode;
pub mod kind;
pub mod offsets;
pub mod privileges;
pub mod probes;
