//! This process's resource use, from `/proc/self`.

pub struct Process {
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

/// `None` when `/proc` cannot be read.
pub fn read() -> Option<Process> {
    let stat = Stat::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let boot_time = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let (ticks, page) = (super::sys::clock_ticks(), super::sys::page_size());
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    Some(Process {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        // The directory's own descriptor, open while it is read, is not the process's.
        open_fds: open_fds.saturating_sub(1),
        max_fds,
        resident_bytes: stat.rss_pages * page,
        virtual_bytes: stat.vsize,
        threads: stat.threads,
        start_time_seconds: boot_time as f64 + stat.start_ticks as f64 / ticks,
    })
}

/// The fields of `/proc/self/stat` used here (proc(5)).
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Stat> {
        // The command name (field 2) may contain spaces and parentheses: fields are counted
        // from the last `)`. Field n (1-based) is then at index n - 3.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (sh (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 123456 10485760 2560 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 250,
                stime: 50,
                threads: 7,
                start_ticks: 123456,
                vsize: 10485760,
                rss_pages: 2560,
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
        assert_eq!(boot_time("cpu 1 2\nbtime 1700000000\n"), Some(1700000000));
    }

    #[test]
    fn reads_this_process() {
        let p = read().expect("/proc is readable");
        assert!(p.open_fds >= 3 && p.threads >= 1 && p.resident_bytes > 0);
        assert!(p.start_time_seconds > 1.6e9);
    }
}
