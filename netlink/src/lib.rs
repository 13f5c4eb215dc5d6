//! Synchronous rtnetlink for vfvm (being written).
