//! Jobs: heavy work recorded durably and run by whichever front has room,
//! outliving the call that asked for it. [`store`] says what is kept and
//! the narrow interface of a store; [`sqlite`] is the embedded backend.
pub mod sqlite;
pub mod store;
