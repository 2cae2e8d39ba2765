//! `tandem fixture`: writes a built-in or JSON-described machine as a sysfs/procfs/devfs tree,
//! so discovery, `tandem topo` and the plugin can run against it instead of the host.

use crate::fixture::{MachineDescription, builtin, builtin_names, write_machine};
use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct FixtureArgs {
    /// Built-in machine to write (see --list).
    #[arg(required_unless_present_any = ["list", "from"], conflicts_with_all = ["list", "from"])]
    pub name: Option<String>,
    /// Directory to write into: DIR/sys, DIR/proc and DIR/dev (DIR/sys must be empty or absent).
    #[arg(long, value_name = "DIR", required_unless_present = "list")]
    pub out: Option<PathBuf>,
    /// Write the machine described by this JSON file instead of a built-in one.
    #[arg(long, value_name = "FILE.json", conflicts_with = "list")]
    pub from: Option<PathBuf>,
    /// Print the built-in machine names and exit.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: FixtureArgs) -> anyhow::Result<()> {
    if args.list {
        for name in builtin_names() {
            println!("{name}");
        }
        return Ok(());
    }
    let desc = match (&args.name, &args.from) {
        (Some(name), _) => match builtin(name) {
            Some(desc) => desc,
            None => bail!(
                "unknown fixture machine {name:?}; built-in machines: {}",
                builtin_names().join(", ")
            ),
        },
        (None, Some(file)) => read_description(file)?,
        (None, None) => bail!("name a built-in machine, or give --from FILE.json or --list"),
    };
    let Some(out) = &args.out else {
        bail!("--out DIR is required to write a machine");
    };
    let roots = write_machine(&desc, out)
        .with_context(|| format!("writing fixture machine {:?}", desc.name))?;
    println!(
        "wrote {} ({} devices): --sysfs-root {} --proc-root {} --dev-root {}",
        desc.name,
        desc.devices.len(),
        roots.sys.display(),
        roots.proc.display(),
        roots.dev.display()
    );
    Ok(())
}

fn read_description(file: &std::path::Path) -> anyhow::Result<MachineDescription> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading machine description {}", file.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("parsing machine description {}", file.display()))
}
