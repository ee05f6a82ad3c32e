//! Wire tests against captured traffic and hostile input.

mod captured;
mod fuzz;
mod hex;
mod malformed;
mod props;
mod vectors;
