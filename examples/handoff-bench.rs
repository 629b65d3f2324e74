//! Hand-off benchmark (issue #6): work in progress.

fn main() {}
