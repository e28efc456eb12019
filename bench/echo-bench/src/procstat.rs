//! What the server costs, read from `/proc`, and the file-descriptor limit the client needs.
//!
//! CPU time is `utime + stime` of the whole process (all threads, field 14 and 15 of
//! `/proc/PID/stat`), in clock ticks (usually 10 ms; over a window of seconds that is well under
//! 1 %). Memory is `VmRSS` from `/proc/PID/status`.

use std::fs;
use std::time::Duration;

/// A server process we watch.
#[derive(Clone, Copy, Debug)]
pub struct Server {
    pub pid: u32,
}

impl Server {
    /// Checks the process exists and its stat file parses, so a wrong PID fails up front.
    pub fn open(pid: u32) -> Result<Self, String> {
        let s = Server { pid };
        s.cpu_time()
            .map_err(|e| format!("--server-pid {pid}: {e}"))?;
        Ok(s)
    }

    /// Total CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Result<Duration, String> {
        let path = format!("/proc/{}/stat", self.pid);
        let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| format!("unexpected format of {path}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
        let tick = |i: usize| -> Result<u64, String> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| format!("unexpected format of {path}"))
        };
        let ticks = tick(11)? + tick(12)?;
        Ok(Duration::from_secs_f64(
            ticks as f64 / clock_ticks_per_second(),
        ))
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.pid);
        let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no VmRSS in {path}"))
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Raises the soft RLIMIT_NOFILE to what `needed` asks for: to the hard limit, and past it when
/// we are allowed to (root). Returns the soft limit now in force.
pub fn raise_nofile(needed: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        ));
    }
    if lim.rlim_max < needed {
        let raised = libc::rlimit {
            rlim_cur: needed,
            rlim_max: needed,
        };
        // SAFETY: valid pointer; failure (not root) is handled by falling back to the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(needed);
        }
    }
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: valid pointer; raising soft up to hard is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Ok(lim.rlim_cur);
    }
    Ok(lim.rlim_max)
}
