//! placeholder during dependency build
fn main() {}
