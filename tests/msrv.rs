//! The README promises a build with Rust 1.85 (`rust-version` in Cargo.toml): every locked
//! dependency must accept it. A `cargo update` that pulls in a crate needing a newer
//! compiler fails here, not on a user's machine.

#[test]
fn every_locked_dependency_builds_with_the_declared_rust_version() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = |v: &str| -> (u64, u64) {
        let mut it = v.split('.').map(|x| x.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let too_new: Vec<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let rv = p["rust_version"].as_str()?;
            (version(rv) > ours).then(|| format!("{} {} needs Rust {rv}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "Cargo.toml says rust-version {}, but: {too_new:?}",
        env!("CARGO_PKG_RUST_VERSION")
    );
}
