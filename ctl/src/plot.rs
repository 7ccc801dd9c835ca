//! What the pictures convoyctl draws share: the file format, by the
//! file's extension (checked before the work that is drawn runs), and the
//! font — DejaVu Sans, embedded, so no system font is read.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use plotters::style::FontStyle;

/// The font family the charts name (registered from the embedded font).
pub const FONT: &str = "sans-serif";

/// What a `--plot FILE` writes, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.svg`
    Svg,
    /// `.png`
    Png,
    /// `.json`: the series drawn (where the command offers them).
    Json,
}

/// The format `path` names; `series`: whether `FILE.json` is one.
pub fn format(path: &Path, series: bool) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(Format::Svg),
        Some(e) if e.eq_ignore_ascii_case("png") => Ok(Format::Png),
        Some(e) if series && e.eq_ignore_ascii_case("json") => Ok(Format::Json),
        _ if series => bail!(
            "{}: --plot takes FILE.svg, FILE.png or FILE.json",
            path.display()
        ),
        _ => bail!("{}: --plot takes FILE.svg or FILE.png", path.display()),
    }
}

/// Registers the embedded font under [`FONT`] (before drawing).
pub fn register_font() -> Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded DejaVu Sans font does not load"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(format(Path::new("a/b.svg"), false).unwrap(), Format::Svg);
        assert_eq!(format(Path::new("b.PNG"), false).unwrap(), Format::Png);
        assert!(format(Path::new("b.json"), false).is_err());
        assert_eq!(format(Path::new("b.json"), true).unwrap(), Format::Json);
        assert!(format(Path::new("b.txt"), true).is_err());
        assert!(format(Path::new("b"), true).is_err());
    }
}
