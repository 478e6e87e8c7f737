//! Builds the bare-metal test guests in `bare/` with a nested cargo invocation.
//!
//! The guests use only the host target (`x86_64-unknown-linux-gnu`, always installed) as a
//! freestanding, statically linked ELF: no extra rustup target. Their one dependency,
//! smoltcp (the `netserve` guest's TCP/IP stack), comes from crates.io at the versions in
//! `bare/Cargo.lock` (downloaded by the first build, like the outer build's crates). The nested build
//! has its own target directory under `OUT_DIR`, so it never contends for the outer build's
//! lock, and a clean environment so the outer build's flags and wrappers (clippy, coverage)
//! do not leak into it. The images are copied to `OUT_DIR` for `include_bytes!` and to
//! `target/<profile>/guests/` so other VMMs (QEMU) can boot the very same files.
use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &["counter", "dirtier", "smp", "pages", "journal", "netserve"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let bare = manifest.join("bare");
    let host = std::env::var("HOST").unwrap();
    if !host.starts_with("x86_64-") {
        panic!("ftvm test guests are x86_64 images; host {host} cannot build them");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("bare-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&bare)
        .args(["build", "--release", "--target", &host])
        .arg("--target-dir")
        .arg(&target_dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Crelocation-model=static", "-Ctarget-cpu=x86-64"].join("\x1f"),
    );
    let status = cmd
        .status()
        .expect("running nested cargo for the test guests");
    assert!(
        status.success(),
        "building the test guests in {} failed",
        bare.display()
    );

    let built = target_dir.join(&host).join("release");
    // target/<profile>/guests/: OUT_DIR is target/<profile>/build/guests-*/out
    let profile_dir = out.ancestors().nth(3).map(|p| p.join("guests"));
    for g in GUESTS {
        let src = built.join(g);
        std::fs::copy(&src, out.join(g)).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        if let Some(dir) = &profile_dir {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(&src, dir.join(format!("{g}.elf")));
        }
    }
    println!("cargo:rerun-if-changed=bare/src");
    println!("cargo:rerun-if-changed=bare/Cargo.toml");
    println!("cargo:rerun-if-changed=bare/link.ld");
    println!("cargo:rerun-if-changed=bare/build.rs");
}
