//! Transaction ids: 8 bytes of ZODB `TimeStamp`. The first 4 bytes
//! (big-endian) count minutes since 1900-01-01 in a calendar of 31-day
//! months, the last 4 are the seconds scaled by 2**32/60.

/// The zero tid (`ZODB.utils.z64`): an empty storage's lastTransaction.
pub const Z64: [u8; 8] = [0; 8];

const SECOND_BIAS: f64 = 60.0 / 65536.0 / 65536.0;
const MINUTES_PER_DAY: u32 = 24 * 60;
const MINUTES_PER_MONTH: u32 = 31 * MINUTES_PER_DAY;
const MINUTES_PER_YEAR: u32 = 12 * MINUTES_PER_MONTH;
/// Days before each month, non-leap and leap years.
const MONTH_OFFSET: [[i64; 12]; 2] = [
    [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334],
    [0, 31, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335],
];
/// Latest time `unix_to_tid` accepts: 9999-12-31T23:59:59Z.
const MAX_UNIX: f64 = 253_402_300_799.0;

/// Lower-case hex of the bytes, as tids and oids are usually logged.
pub fn tid_to_hex(tid: &[u8]) -> String {
    tid.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn tid_to_u64(tid: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(tid.try_into().ok()?))
}

pub fn tid_from_u64(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Seconds since the Unix epoch, exactly as `TimeStamp(tid).timeTime()`
/// of the C implementation computes them. `None` unless `tid` is 8 bytes.
pub fn tid_to_unix(tid: &[u8]) -> Option<f64> {
    let tid: &[u8; 8] = tid.try_into().ok()?;
    let [a0, a1, a2, a3, b0, b1, b2, b3] = *tid;
    let minutes = u32::from_be_bytes([a0, a1, a2, a3]);
    let year = i64::from(minutes / MINUTES_PER_YEAR) + 1900;
    let month0 = (minutes % MINUTES_PER_YEAR) / MINUTES_PER_MONTH;
    let day0 = (minutes % MINUTES_PER_MONTH) / MINUTES_PER_DAY;
    let minute_of_day = minutes % MINUTES_PER_DAY;
    let leap = usize::from(is_leap(year));
    let month_offset = MONTH_OFFSET[leap][month0 as usize % 12];
    // Same operation order as the C code, so the float result matches.
    let days = days_before_year(year) + month_offset + i64::from(day0);
    let abst = days as f64 * 86400.0 + f64::from(minute_of_day * 60);
    let seconds = SECOND_BIAS * f64::from(u32::from_be_bytes([b0, b1, b2, b3]));
    let epoch = days_before_year(1970) as f64 * 86400.0;
    Some(abst + seconds - epoch)
}

/// The tid `ZODB.utils.newTid(None)` would make at Unix time `secs`.
/// Times before 1970 or after 9999 (and NaN) are clamped.
pub fn unix_to_tid(secs: f64) -> [u8; 8] {
    let secs = if secs.is_nan() {
        0.0
    } else {
        secs.clamp(0.0, MAX_UNIX)
    };
    // Python: TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).
    let whole = secs.floor() as i64;
    let (year, month, day) = civil_from_days(whole.div_euclid(86400));
    let second_of_day = whole.rem_euclid(86400);
    let (hour, minute) = (second_of_day / 3600, second_of_day % 3600 / 60);
    let minutes = (((((year - 1900) * 12 + month - 1) * 31 + day - 1) * 24 + hour) * 60) + minute;
    // In range for years 1970..=9999.
    let minutes = u32::try_from(minutes).unwrap_or(u32::MAX);
    let fraction = (secs % 60.0) / SECOND_BIAS;
    let fraction = fraction as u32;
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&minutes.to_be_bytes());
    out[4..].copy_from_slice(&fraction.to_be_bytes());
    out
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// `TimeStamp_yad`: days from an arbitrary origin to January 1 of `year`
/// (only differences are used).
fn days_before_year(year: i64) -> i64 {
    let mut y = year - 1900;
    let days = (y - 1) * 365;
    if y > 0 {
        y -= 1;
        days + (y / 4 - y / 100 + (y + 300) / 400)
    } else {
        y = -y;
        days - (y / 4 - y / 100 + (y + 300) / 400)
    }
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// algorithm, proleptic Gregorian). The one calendar routine of the crate.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a (year, month, day), proleptic Gregorian; the
/// inverse of [`civil_from_days`]. Linear in `d`, so an out-of-range day
/// (Feb 31) counts on into the next month, as ZODB's TimeStamp does.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
