//! Wire tests against captured traffic and hostile input.

mod captured;
mod fuzz;
mod hex;
mod lazy;
mod malformed;
mod props;
mod vectors;
