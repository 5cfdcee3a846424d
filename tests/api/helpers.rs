//! What the test files import: the harness (`harness`), the HTTP client
//! (`client`) and the streams (`sockets`), re-exported in one place so a test
//! needs a single `use crate::helpers::{…}`.

pub use crate::{client::*, harness::*, sockets::*};
