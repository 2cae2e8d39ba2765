//! Device numbers for the char devices a container needs: sysfs `dev` files (`231:192`) and
//! the character-device majors of `/proc/devices`, so no CDI spec ever has to stat `/dev`.

use super::Problems;
use super::reader::{ReadError, RootedReader, SysDir};
use crate::topology::{CharDevice, PciAddress};
use std::collections::HashMap;

/// `231:192` -> (231, 192).
pub fn parse_dev_numbers(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((parse_decimal(major)?, parse_decimal(minor)?))
}

fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Reads `<dir>/dev` into a char device at `dev_path` (relative to the dev root).
pub fn read_char_device(dir: &SysDir<'_>, dev_path: String) -> Result<CharDevice, ReadError> {
    let (major, minor) = dir.parsed("dev", "major:minor such as \"231:192\"", parse_dev_numbers)?;
    Ok(CharDevice {
        path: dev_path,
        major,
        minor,
    })
}

/// The "Character devices:" section of `/proc/devices`: driver name -> major.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcDevices {
    majors: HashMap<String, u32>,
}

impl ProcDevices {
    pub fn parse(text: &str) -> Self {
        let mut majors = HashMap::new();
        let mut in_char_section = false;
        for line in text.lines() {
            let line = line.trim();
            if line.ends_with(':') {
                in_char_section = line == "Character devices:";
                continue;
            }
            if !in_char_section {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(major), Some(name), None) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if let Some(major) = parse_decimal(major) {
                // The first registration of a name wins, as it does for the kernel's lookups.
                majors.entry(name.to_string()).or_insert(major);
            }
        }
        Self { majors }
    }

    pub fn major(&self, name: &str) -> Option<u32> {
        self.majors.get(name).copied()
    }
}

/// `/proc/devices`, read the first time someone needs a major and kept for the rest of the scan.
pub struct LazyProcDevices<'r> {
    proc: &'r RootedReader,
    loaded: Option<Option<ProcDevices>>,
}

impl<'r> LazyProcDevices<'r> {
    pub fn new(proc: &'r RootedReader) -> Self {
        Self { proc, loaded: None }
    }

    /// The major registered as `name`; when the file or the line is missing, a problem that
    /// names `/proc/devices` and what was looked for.
    pub fn major(
        &mut self,
        name: &str,
        device: Option<PciAddress>,
        problems: &mut Problems,
    ) -> Option<u32> {
        let proc = self.proc;
        let loaded = self.loaded.get_or_insert_with(|| {
            let read = proc.dir("").and_then(|d| d.attr("devices"));
            match read {
                Ok(text) => Some(ProcDevices::parse(&text)),
                Err(e) => {
                    problems.add(device, e);
                    None
                }
            }
        });
        let major = loaded.as_ref()?.major(name);
        if major.is_none() {
            problems.message(
                device,
                proc.host_path("devices".as_ref()),
                format!("no character device named {name:?} (is its kernel module loaded?)"),
            );
        }
        major
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers() {
        assert_eq!(parse_dev_numbers("231:192\n"), Some((231, 192)));
        assert_eq!(parse_dev_numbers("226:128"), Some((226, 128)));
        for bad in [
            "",
            "231",
            "231:",
            ":1",
            "a:b",
            "231:192:1",
            "-1:0",
            "231 :192",
            "0x1:2",
        ] {
            assert_eq!(parse_dev_numbers(bad), None, "{bad}");
        }
    }

    #[test]
    fn proc_devices_char_section_only() {
        let text = "Character devices:\n  1 mem\n195 nvidia-frontend\n235 nvidia-uvm\n 10 misc\n\
                    511 vfio\n261 accel\ngarbage line here\nxx bad\n\nBlock devices:\n  8 sd\n259 blkext\n";
        let devices = ProcDevices::parse(text);
        assert_eq!(devices.major("nvidia-uvm"), Some(235));
        assert_eq!(devices.major("vfio"), Some(511));
        assert_eq!(devices.major("accel"), Some(261));
        assert_eq!(devices.major("sd"), None);
        assert_eq!(devices.major("bad"), None);
        assert_eq!(ProcDevices::parse("").major("mem"), None);
    }
}
