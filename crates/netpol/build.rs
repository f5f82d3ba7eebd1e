//! Compiles the eBPF datapath (`ebpf/*.bpf.c`) with clang, and turns the
//! `SKIFF_*` defines of `ebpf/include/skiff_maps.h` into Rust constants, so
//! map layouts and numbers are defined once.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("../../ebpf");
    let out = PathBuf::from(env("OUT_DIR"));
    let header = root.join("include/skiff_maps.h");
    let source = root.join("policy.bpf.c");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed={}", source.display());

    // Debian keeps <asm/types.h> under the multiarch directory.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    let object = out.join("policy.bpf.o");
    let status = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed ({s}) compiling {}", source.display()),
        Err(e) => panic!(
            "cannot run clang ({e}): install clang and libbpf-dev (scripts/install-deps.sh does)"
        ),
    }

    let text =
        std::fs::read_to_string(&header).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
    let mut consts = String::from("// Generated from ebpf/include/skiff_maps.h by build.rs.\n");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("#define SKIFF_") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(char::is_whitespace) else {
            continue;
        };
        let value = value.split("/*").next().unwrap_or_default().trim();
        let Some(v) = eval(value) else {
            panic!("skiff_maps.h: cannot read the value of SKIFF_{name}: {value:?}");
        };
        consts.push_str(&format!("pub const SKIFF_{name}: u32 = {v};\n"));
    }
    std::fs::write(out.join("skiff_maps.rs"), consts).unwrap_or_else(|e| panic!("{e}"));
}

/// `123`, `1u`, `(1u << 3)`, `(1 << 20)`.
fn eval(v: &str) -> Option<u64> {
    let v = v
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    if let Some((a, b)) = v.split_once("<<") {
        return Some(eval(a)? << eval(b)?);
    }
    v.trim_end_matches(['u', 'U']).parse().ok()
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}
