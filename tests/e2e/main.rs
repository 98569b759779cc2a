//! End-to-end tests against the real binaries, one module per area.

mod smoke;
