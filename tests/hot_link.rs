//! hack/link-hot-first.sh, the linker .cargo/config.toml names for x86_64 Linux: a real link
//! through `cc` and rustc's own lld puts the listed functions first, found by their names
//! without hashes, and in the list's order; every other link goes through unchanged.
//!
//! Needs cc, nm and the toolchain's gcc-ld/lld (what linking Rust on Linux needs anyway):
//! without them the tests print why they skip, except under CI=true, where they fail.

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/link-hot-first.sh")
}

/// rustc's directory holding the `ld.lld` that `cc -fuse-ld=lld -B` picks up.
fn gcc_ld_dir() -> Option<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "target-libdir"])
        .output()
        .ok()?;
    let libdir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let dir = libdir.parent()?.join("bin/gcc-ld");
    dir.join("ld.lld").exists().then_some(dir)
}

fn tools_or_skip(test: &str) -> Option<PathBuf> {
    let missing: Vec<&str> = ["cc", "nm"]
        .into_iter()
        .filter(|tool| Command::new(tool).arg("--version").output().is_err())
        .collect();
    let gcc_ld = gcc_ld_dir();
    if missing.is_empty()
        && let Some(dir) = gcc_ld
    {
        return Some(dir);
    }
    let why = format!("{test}: skipped: missing {missing:?} or the toolchain's gcc-ld/ld.lld");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("{why}");
    None
}

/// Three functions, two under Rust-mangled names with hashes, in their own sections (as rustc
/// emits them), compiled to an object in `dir`.
fn object(dir: &Path) -> PathBuf {
    compile(
        dir,
        "functions",
        r#"
void cold(void) __asm__("_ZN4demo4cold17h00000000000000aaE");
void cold(void) { __asm__ volatile("nop"); }
void warm(void) __asm__("_ZN4demo4warm17h1111111111111111E.llvm.42");
void warm(void) { __asm__ volatile("nop; nop"); }
void hot(void) { __asm__ volatile("nop; nop; nop"); }
int main(void) { cold(); warm(); hot(); return 0; }
"#,
    )
}

/// `source` compiled to `<dir>/<name>.o`, each function in its own section (as rustc emits
/// them).
fn compile(dir: &Path, name: &str, source: &str) -> PathBuf {
    let path = dir.join(format!("{name}.c"));
    std::fs::write(&path, source).expect("write source");
    let object = dir.join(format!("{name}.o"));
    let status = Command::new("cc")
        .args(["-c", "-O0", "-ffunction-sections", "-fPIE", "-o"])
        .arg(&object)
        .arg(&path)
        .status()
        .expect("cc");
    assert!(status.success(), "cc -c {name}.c failed");
    object
}

/// Links `object` to `output` through the script with `list` as its hot functions.
fn link(gcc_ld: &Path, object: &Path, output: &Path, list: &Path) -> std::process::Output {
    link_with(gcc_ld, object, &[], output, list)
}

/// As [`link`], with `libraries` (`-L`/`-l` arguments) after the object on the link line.
fn link_with(
    gcc_ld: &Path,
    object: &Path,
    libraries: &[String],
    output: &Path,
    list: &Path,
) -> std::process::Output {
    std::fs::create_dir_all(output.parent().expect("parent")).expect("mkdir");
    Command::new("bash")
        .arg(script())
        .arg("-fuse-ld=lld")
        .arg(format!("-B{}", gcc_ld.display()))
        .arg("-pie")
        .arg(object)
        .args(libraries)
        .arg("-o")
        .arg(output)
        .env("TANDEM_HOT_FUNCTIONS", list)
        .output()
        .expect("run hack/link-hot-first.sh")
}

/// The binary's functions of `names` by address, lowest first.
fn in_address_order(binary: &Path, names: &[&str]) -> Vec<String> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .expect("nm");
    let mut found: Vec<(u64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let name = fields.nth(1)?;
            names
                .iter()
                .any(|n| name.starts_with(n))
                .then(|| (address, name.to_string()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, name)| name).collect()
}

#[test]
fn the_node_binary_is_linked_with_the_listed_functions_first() {
    let Some(gcc_ld) = tools_or_skip("the_node_binary_is_linked_with_the_listed_functions_first")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let object = object(dir.path());
    let names = ["_ZN4demo4cold", "_ZN4demo4warm", "hot"];

    // The list names them without hashes and suffixes, hot before warm; cold is unlisted.
    let list = dir.path().join("hot-functions.txt");
    std::fs::write(&list, "# a comment\nhot\n_ZN4demo4warmE\n_ZN4demo4goneE\n").expect("list");
    let output = dir.path().join("target/node/deps/tandem-0123");
    let linked = link(&gcc_ld, &object, &output, &list);
    assert!(
        linked.status.success(),
        "link failed: {}",
        String::from_utf8_lossy(&linked.stderr)
    );
    assert_eq!(
        in_address_order(&output, &names),
        [
            "hot",
            "_ZN4demo4warm17h1111111111111111E.llvm.42",
            "_ZN4demo4cold17h00000000000000aaE"
        ]
    );
    let order = std::fs::read_to_string(output.with_extension("hot-order")).expect("order file");
    assert_eq!(
        order,
        "# 2 of 3 hot functions found in this link\nhot\n_ZN4demo4warm17h1111111111111111E.llvm.42\n"
    );

    // The reverse list gives the reverse order: the order is the list's, not the source's.
    std::fs::write(&list, "_ZN4demo4coldE\n_ZN4demo4warmE\nhot\n").expect("list");
    let linked = link(&gcc_ld, &object, &output, &list);
    assert!(linked.status.success());
    assert_eq!(
        in_address_order(&output, &names),
        [
            "_ZN4demo4cold17h00000000000000aaE",
            "_ZN4demo4warm17h1111111111111111E.llvm.42",
            "hot"
        ]
    );
}

#[test]
fn listed_functions_of_a_library_given_as_l_come_first_too() {
    let Some(gcc_ld) = tools_or_skip("listed_functions_of_a_library_given_as_l_come_first_too")
    else {
        return;
    };
    // As glibc in the static node build: the library is `-lc`, not a path on the link line,
    // so the script cannot read its symbols; a plain C name of the list goes to lld as it is.
    let dir = tempfile::tempdir().expect("tempdir");
    let main = compile(
        dir.path(),
        "main",
        "void from_library(void);\nvoid local(void) { __asm__ volatile(\"nop\"); }\n\
         int main(void) { local(); from_library(); return 0; }\n",
    );
    let member = compile(
        dir.path(),
        "member",
        "void from_library(void) { __asm__ volatile(\"nop; nop\"); }\n",
    );
    let archive = dir.path().join("libextra.a");
    let status = Command::new("ar")
        .arg("rcs")
        .arg(&archive)
        .arg(&member)
        .status()
        .expect("ar");
    assert!(status.success(), "ar failed");
    let list = dir.path().join("hot-functions.txt");
    std::fs::write(&list, "from_library\n_ZN4demo4goneE\n").expect("list");
    let output = dir.path().join("target/node/deps/tandem-0123");
    let libraries = [format!("-L{}", dir.path().display()), "-lextra".to_string()];
    let linked = link_with(&gcc_ld, &main, &libraries, &output, &list);
    assert!(
        linked.status.success(),
        "link failed: {}",
        String::from_utf8_lossy(&linked.stderr)
    );
    // Unlisted, `local` would come first: its object is before the library on the link line.
    assert_eq!(
        in_address_order(&output, &["from_library", "local"]),
        ["from_library", "local"]
    );
    let order = std::fs::read_to_string(output.with_extension("hot-order")).expect("order file");
    assert_eq!(
        order, "# 0 of 2 hot functions found in this link\nfrom_library\n",
        "a mangled name not found stays out"
    );
}

#[test]
fn other_links_go_through_unchanged() {
    let Some(gcc_ld) = tools_or_skip("other_links_go_through_unchanged") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let object = object(dir.path());
    let list = dir.path().join("hot-functions.txt");
    std::fs::write(&list, "hot\n").expect("list");
    // A test binary of the debug profile: linked, and no order file written.
    let output = dir.path().join("target/debug/deps/tandem-0123");
    let linked = link(&gcc_ld, &object, &output, &list);
    assert!(linked.status.success());
    assert!(output.exists());
    assert!(!output.with_extension("hot-order").exists());
}

#[test]
fn names_lose_their_hashes_and_nothing_else() {
    let Some(_) = tools_or_skip("names_lose_their_hashes_and_nothing_else") else {
        return;
    };
    let mut child = Command::new("bash")
        .arg(script())
        .arg("--unhashed")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run --unhashed");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            b"_ZN5tokio7runtime4task3raw4poll17h0123456789abcdefE\n\
              _ZN6tandem4main17hfedcba9876543210E.llvm.12345678\n\
              _ZN4http6header4name10HeaderName6as_str17hf1e3d0a223fc0c97E.696\n\
              _RNvMs5_NtNtCs1a_3std2io5errorNtB5_5Error4kind.1042\n\
              _RNvNtCsgEmfK2I1SDS_4core3fmt5write\n\
              _RINvNtCs1234_5alloc3vec8from_elemCsabc_3stdE\n\
              memcpy\n",
        )
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "_ZN5tokio7runtime4task3raw4pollE\n\
         _ZN6tandem4mainE\n\
         _ZN4http6header4name10HeaderName6as_strE\n\
         _RNvMs5_NtNtC3std2io5errorNtB5_5Error4kind\n\
         _RNvNtC4core3fmt5write\n\
         _RINvNtC5alloc3vec8from_elemC3stdE\n\
         memcpy\n"
    );
}
