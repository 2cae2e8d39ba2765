//! The Dockerfile and hack/build-image.sh (the engine-less build CI runs) describe one image:
//! the same entrypoint, user and labels, a Debian base of the same release, a library set that
//! holds everything the binary links (and distroless cc holds it too), and an entrypoint that is
//! the binary the DaemonSet's `hook install` init container copies to the host. Cheap: it reads
//! files and asks the script for its plan (`--print-config`); it builds no image.
//!
//! Needs bash and python3 (for the script's plan): without them the tests print why they skip,
//! except under CI=true, where they fail.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The final stage of a Dockerfile, read independently of the script's own parser.
#[derive(Debug, Default)]
struct FinalStage {
    base: String,
    args: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    user: Option<String>,
    entrypoint: Vec<String>,
    copies: Vec<Vec<String>>,
}

fn parse_dockerfile(text: &str) -> FinalStage {
    let mut logical = Vec::new();
    let mut buf = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && buf.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                buf.push_str(head);
                buf.push(' ');
            }
            None => {
                buf.push_str(line);
                logical.push(std::mem::take(&mut buf));
            }
        }
    }
    let mut stage = FinalStage::default();
    for line in logical {
        let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let rest = rest.trim();
        match word.to_ascii_uppercase().as_str() {
            "FROM" => {
                stage = FinalStage {
                    base: rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    ..FinalStage::default()
                }
            }
            "ARG" => {
                let (name, default) = rest.split_once('=').unwrap_or((rest, ""));
                stage
                    .args
                    .insert(name.to_string(), default.trim_matches('"').to_string());
            }
            "LABEL" => {
                for (key, value) in words(rest).iter().filter_map(|w| w.split_once('=')) {
                    let value = expand(value, &stage.args);
                    stage.labels.insert(key.to_string(), value);
                }
            }
            "USER" => stage.user = Some(rest.to_string()),
            "ENTRYPOINT" => {
                stage.entrypoint = serde_json::from_str(rest).expect("ENTRYPOINT in exec form")
            }
            "COPY" => stage.copies.push(words(rest)),
            _ => {}
        }
    }
    stage
}

/// Shell-like words: whitespace-separated, double quotes grouping (and dropped).
fn words(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn expand(value: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (name, val) in args {
        out = out.replace(&format!("${{{name}}}"), val);
    }
    out
}

fn dockerfile() -> FinalStage {
    let path = repo().join("Dockerfile");
    parse_dockerfile(&std::fs::read_to_string(&path).expect("reading Dockerfile"))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// None (after saying why) when bash or python3 is missing outside CI.
fn tools_or_skip(test: &str) -> Option<()> {
    if have("bash") && have("python3") {
        return Some(());
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "bash and python3 are needed to read hack/build-image.sh's plan, and CI=true"
    );
    eprintln!("{test}: skipped: bash or python3 not found");
    None
}

/// `hack/build-image.sh --print-config [--dockerfile PATH]`: status success and stdout, or stderr.
fn script_plan(dockerfile: Option<&Path>) -> Result<Value, String> {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("hack/build-image.sh"))
        .arg("--print-config")
        .current_dir(repo());
    if let Some(path) = dockerfile {
        cmd.arg("--dockerfile").arg(path);
    }
    let out = cmd.output().expect("running bash");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("--print-config prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn script_builds_the_dockerfiles_entrypoint_user_and_labels() {
    let Some(()) = tools_or_skip("script_builds_the_dockerfiles_entrypoint_user_and_labels") else {
        return;
    };
    let df = dockerfile();
    let plan = script_plan(None).expect("hack/build-image.sh --print-config");

    assert_eq!(plan["base"], df.base.as_str(), "runtime base");
    assert_eq!(strings(&plan["entrypoint"]), df.entrypoint, "ENTRYPOINT");
    assert_eq!(
        plan["user"].as_str(),
        df.user.as_deref(),
        "USER (the Dockerfile sets it; the script must set the same)"
    );
    let labels: BTreeMap<String, String> =
        serde_json::from_value(plan["labels"].clone()).expect("labels as a string map");
    assert_eq!(
        labels, df.labels,
        "LABELs, keys and values (build args at their defaults)"
    );
    assert!(
        labels.contains_key("org.opencontainers.image.version"),
        "the version label is what `tandem version` is compared with"
    );

    // The one binary the Dockerfile copies is the entrypoint, and the script installs it there.
    assert_eq!(
        df.copies,
        vec![vec![
            "--from=builder".to_string(),
            df.entrypoint[0].clone(),
            df.entrypoint[0].clone()
        ]],
        "the runtime stage copies the builder's binary to the ENTRYPOINT path and nothing else"
    );
    assert_eq!(plan["binary"], df.entrypoint[0].as_str());

    // distroless cc-debian<N> is Debian <N>; the script's packages come from that release.
    let release = df
        .base
        .split(['-', ':'])
        .find_map(|part| part.strip_prefix("debian"))
        .expect("a distroless -debian<N> base");
    let suite = match release {
        "11" => "bullseye",
        "12" => "bookworm",
        "13" => "trixie",
        other => panic!("unknown Debian release {other}"),
    };
    assert_eq!(plan["suite"], suite, "Debian suite of the script's base");
}

#[test]
fn script_refuses_a_dockerfile_it_does_not_replicate() {
    let Some(()) = tools_or_skip("script_refuses_a_dockerfile_it_does_not_replicate") else {
        return;
    };
    let original = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "RUN in the runtime stage",
            original.replace(
                "USER 65532:65532",
                "RUN [\"/tandem\", \"version\"]\nUSER 65532:65532",
            ),
            "does not replicate",
        ),
        (
            "another base image",
            original.replace(
                "gcr.io/distroless/cc-debian12:nonroot\n",
                "gcr.io/distroless/base-debian12:nonroot\n",
            ),
            "runtime base",
        ),
        (
            "a second file copied",
            original.replace(
                "COPY --from=builder /tandem /tandem",
                "COPY --from=builder /tandem /tandem\nCOPY README.md /README.md",
            ),
            "COPY",
        ),
    ];
    for (what, text, expected) in cases {
        assert_ne!(text, original, "{what}: the edit did not apply");
        let path = dir.path().join("Dockerfile");
        std::fs::write(&path, text).expect("writing Dockerfile");
        let err = script_plan(Some(&path)).expect_err(what);
        assert!(err.contains(expected), "{what}: {err}");
    }
}

#[test]
fn dockerfile_version_is_the_crate_version() {
    let df = dockerfile();
    assert_eq!(
        df.args.get("VERSION").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "ARG VERSION's default is the version label; `tandem version` prints the crate's"
    );
}

/// What the builder stage copies from the context (`COPY` without `--from`, before the final
/// stage): each source path as written.
fn builder_copies(text: &str) -> Vec<String> {
    let mut copies = Vec::new();
    let mut stages = 0;
    for line in text.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        let args = words(rest);
        if stages != 1 || args.iter().any(|a| a.starts_with("--from")) {
            continue;
        }
        if let Some((_, sources)) = args.split_last() {
            copies.extend(sources.iter().cloned());
        }
    }
    copies
}

/// The Docker build reads what a `cargo build` of the package reads: the build script, the
/// cargo config and the linker it names with that linker's list. The first release of
/// build.rs (the PCI name tables) was missing from the Dockerfile and its .dockerignore,
/// which only a real `docker build` would have shown: hack/build-image.sh builds from the
/// checkout.
#[test]
fn the_builder_stage_copies_every_input_of_the_build() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let copies = builder_copies(&dockerfile);
    // .dockerignore excludes everything, then lets paths back in with `!path`.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let allowed: Vec<String> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    let mut needed: Vec<String> = ["Cargo.toml", "Cargo.lock", "src", "crates", "benches"]
        .map(String::from)
        .to_vec();
    if repo().join("build.rs").exists() {
        needed.push("build.rs".into());
    }
    let config = repo().join(".cargo/config.toml");
    if let Ok(text) = std::fs::read_to_string(&config) {
        needed.push(".cargo".into());
        for line in text.lines() {
            if let Some(value) = line.trim().strip_prefix("linker = ") {
                let linker = value.trim_matches('"').to_string();
                needed.push(linker);
                needed.push("hack/hot-functions.txt".into());
            }
        }
    }
    let covered = |path: &str, by: &[String]| {
        by.iter()
            .any(|p| path == p || path.starts_with(&format!("{p}/")))
    };
    for path in &needed {
        assert!(
            repo().join(path).exists(),
            "{path} is an input of the build but is not in the repository"
        );
        assert!(
            covered(path, &copies),
            "the Dockerfile's builder stage does not COPY {path} (copies {copies:?})"
        );
        assert!(
            covered(path, &allowed),
            ".dockerignore keeps {path} out of the build context (lets in {allowed:?})"
        );
    }
}

/// Sonames each Debian 12 package provides (the ones a Rust binary can link).
fn package_sonames(package: &str) -> Option<&'static [&'static str]> {
    Some(match package {
        "libc6" => &[
            "ld-linux-x86-64.so.2",
            "ld-linux-aarch64.so.1",
            "libc.so.6",
            "libm.so.6",
            "libmvec.so.1",
            "libpthread.so.0",
            "libdl.so.2",
            "librt.so.1",
            "libresolv.so.2",
            "libutil.so.1",
            "libanl.so.1",
        ],
        "libgcc-s1" => &["libgcc_s.so.1"],
        "libstdc++6" => &["libstdc++.so.6"],
        "libgomp1" => &["libgomp.so.1"],
        "libssl3" => &["libssl.so.3", "libcrypto.so.3"],
        "gcc-12-base" => &[],
        _ => return None,
    })
}

/// The library packages in gcr.io/distroless/cc-debian12 (static + libc6, libssl3 + cc's).
const DISTROLESS_CC_PACKAGES: &[&str] =
    &["libc6", "libssl3", "libgcc-s1", "libgomp1", "libstdc++6"];

#[test]
fn both_images_hold_every_library_the_binary_links() {
    let Some(()) = tools_or_skip("both_images_hold_every_library_the_binary_links") else {
        return;
    };
    let plan = script_plan(None).expect("hack/build-image.sh --print-config");
    let sonames = |packages: &[String]| -> BTreeSet<&'static str> {
        packages
            .iter()
            .flat_map(|p| {
                package_sonames(p).unwrap_or_else(|| {
                    panic!("{p}: add the libraries it provides to package_sonames")
                })
            })
            .copied()
            .collect()
    };
    let script = sonames(&strings(&plan["library_packages"]));
    let distroless = sonames(
        &DISTROLESS_CC_PACKAGES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    );

    let binary = Path::new(env!("CARGO_BIN_EXE_tandem"));
    let needed = elf_needed(binary).expect("reading the binary's DT_NEEDED");
    assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
    for lib in &needed {
        assert!(
            script.contains(lib.as_str()),
            "the binary links {lib}, which hack/build-image.sh's LIBRARY_PACKAGES do not provide"
        );
        assert!(
            distroless.contains(lib.as_str()),
            "the binary links {lib}, which the Dockerfile's distroless cc base does not have"
        );
    }
}

/// The DT_NEEDED entries of a 64-bit little-endian ELF file (reads headers, not the whole file).
fn elf_needed(path: &Path) -> std::io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let mut read_at = |offset: u64, len: usize| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut buf)?;
        Ok(buf)
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let header = read_at(0, 64)?;
    assert_eq!(
        &header[..6],
        b"\x7fELF\x02\x01",
        "{}: not ELF64 LE",
        path.display()
    );
    let (shoff, shentsize, shnum) = (
        u64_at(&header, 0x28),
        u16_at(&header, 0x3a) as usize,
        u16_at(&header, 0x3c) as usize,
    );
    let sections = read_at(shoff, shentsize * shnum)?;
    let section = |i: usize| &sections[i * shentsize..(i + 1) * shentsize];
    let Some(dynamic) = (0..shnum).map(section).find(|s| s[4..8] == [6, 0, 0, 0]) else {
        return Ok(Vec::new()); // SHT_DYNAMIC absent: a static binary needs nothing
    };
    let strtab = section(u32::from_le_bytes(dynamic[0x28..0x2c].try_into().unwrap()) as usize);
    let strings = read_at(u64_at(strtab, 0x18), u64_at(strtab, 0x20) as usize)?;
    let entries = read_at(u64_at(dynamic, 0x18), u64_at(dynamic, 0x20) as usize)?;
    let mut needed = Vec::new();
    for entry in entries.chunks_exact(16) {
        match u64_at(entry, 0) {
            0 => break,
            1 => {
                let start = u64_at(entry, 8) as usize;
                let end = start + strings[start..].iter().position(|&b| b == 0).unwrap_or(0);
                needed.push(String::from_utf8_lossy(&strings[start..end]).into_owned());
            }
            _ => {}
        }
    }
    Ok(needed)
}

#[test]
fn hook_install_copies_the_image_entrypoint() {
    // Every init container that runs `hook install` uses the plugin's image and no `command`,
    // so it runs the ENTRYPOINT; `hook install` copies the running binary (current_exe), so the
    // hook on the host is the image's ENTRYPOINT binary, the one both builds put there.
    let df = dockerfile();
    let mut found = 0;
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading deploy/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("reading a manifest");
            for doc in serde_norway::Deserializer::from_str(&text) {
                let doc: Value = serde::Deserialize::deserialize(doc).expect("YAML");
                let inits = &doc["spec"]["template"]["spec"]["initContainers"];
                for init in inits.as_array().into_iter().flatten() {
                    let args: Vec<&str> = init["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    if args.len() < 2 || args[..2] != ["hook", "install"] {
                        continue;
                    }
                    found += 1;
                    let at = path.display();
                    assert_eq!(
                        init["image"], "tandem",
                        "{at}: hook install runs the plugin image"
                    );
                    assert!(
                        init.get("command").is_none(),
                        "{at}: a `command` would bypass the ENTRYPOINT {:?}",
                        df.entrypoint
                    );
                    let to = args.iter().position(|a| *a == "--to");
                    assert!(
                        to.is_some_and(|i| i + 1 < args.len()),
                        "{at}: `hook install` with `--to PATH` as two args \
                         (the form hack/build-image.sh reads): {args:?}"
                    );
                }
            }
        }
    }
    assert!(found > 0, "no `hook install` init container under deploy/");
}
