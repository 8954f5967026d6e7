//! Compiles the V8 shim (native/v8_shim.cc) against Debian's libnode-dev headers and links
//! libnode.so (V8 10.2) with an rpath, so tests and the binary run without LD_LIBRARY_PATH.
//!
//! Where libnode is looked for: `PST_LIBNODE_DIR` (a folder holding `usr/include/node` and
//! `usr/lib/<arch>/libnode.so`, as `dpkg -x` of libnode108 + libnode-dev leaves it), else
//! `~/.cache/plugin-server/libnode` (what `scripts/libnode` fills), else the system (`/`, where the
//! build image installs libnode-dev).

use std::path::{Path, PathBuf};

fn lib_dir(root: &Path) -> Option<PathBuf> {
    let lib = root.join("usr/lib");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&lib).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.push(lib);
    dirs.sort();
    dirs.into_iter().find(|d| d.join("libnode.so").exists())
}

fn main() {
    println!("cargo:rerun-if-changed=native/v8_shim.cc");
    println!("cargo:rerun-if-env-changed=PST_LIBNODE_DIR");
    println!("cargo:rerun-if-env-changed=HOME");
    let mut roots = Vec::new();
    if let Some(dir) = std::env::var_os("PST_LIBNODE_DIR") {
        roots.push(PathBuf::from(dir));
    } else {
        if let Some(home) = std::env::var_os("HOME") {
            roots.push(PathBuf::from(home).join(".cache/plugin-server/libnode"));
        }
        roots.push(PathBuf::from("/"));
    }
    let found = roots.iter().find_map(|root| {
        let include = root.join("usr/include/node");
        let lib = lib_dir(root)?;
        include.join("v8.h").exists().then_some((include, lib))
    });
    let Some((include, lib)) = found else {
        let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        panic!(
            "libnode (V8 headers and libnode.so) not found in {}: run scripts/services (it runs scripts/libnode), \
             or point PST_LIBNODE_DIR at a folder holding `dpkg -x` of libnode108 and libnode-dev",
            looked.join(", ")
        );
    };
    println!("cargo:rerun-if-changed={}", lib.join("libnode.so").display());
    cc::Build::new()
        .cpp(true)
        .file("native/v8_shim.cc")
        .include(&include)
        .flag("-std=c++17")
        // libnode is built without RTTI: a subclass of one of V8's classes (the shim's
        // ArrayBuffer allocator) must be too, or it needs typeinfo libnode does not export.
        .flag("-fno-rtti")
        .opt_level(2)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("pst_v8_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=node");
    if lib != Path::new("/usr/lib") && !lib.starts_with("/usr/lib/") {
        // DT_RPATH (not RUNPATH): it also serves libnode.so's own dependencies.
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
