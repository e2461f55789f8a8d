//! Small previews of input and output pictures for the HTML report, as `data:` URIs
//! so the page needs nothing but itself.
//!
//! Only local PNG and JPEG files are read (the crate's `image` is built with those
//! two codecs). Everything else gets a note instead of a picture: a URL input (the
//! report never goes to the network), a missing file, another format, or a picture
//! too large to decode cheaply. The header is read first, so a huge picture is
//! refused by its dimensions before any pixel is decoded.

use std::io::Cursor;
use std::path::Path;

use base64::Engine as _;
use image::{DynamicImage, ImageFormat, ImageReader};

/// Pictures with more pixels than this are not decoded (a 64 MP photo already needs
/// ~200 MB as RGB and a second or more to decode).
pub const MAX_PIXELS: u64 = 64_000_000;
/// Files larger than this are not read at all.
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;

/// A preview, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thumb {
    Image {
        /// `data:image/jpeg;base64,…` or `data:image/png;base64,…`.
        data_uri: String,
        width: u32,
        height: u32,
        /// The original picture's size.
        source_width: u32,
        source_height: u32,
    },
    None {
        note: String,
    },
}

impl Thumb {
    fn none(note: impl Into<String>) -> Thumb {
        Thumb::None { note: note.into() }
    }
}

/// The preview of `source` (a local path or a URL), at most `side` pixels wide and
/// high.
pub fn make(source: &str, side: u32) -> Thumb {
    let lower = source.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Thumb::none("remote input: not fetched (the report stays offline)");
    }
    from_file(Path::new(source), side)
}

/// The preview of a local file.
pub fn from_file(path: &Path, side: u32) -> Thumb {
    match try_from_file(path, side.max(1)) {
        Ok(t) => t,
        Err(note) => Thumb::None { note },
    }
}

fn try_from_file(path: &Path, side: u32) -> Result<Thumb, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "file not found".to_string(),
        _ => format!("cannot read the file: {e}"),
    })?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} MB: too large to preview",
            meta.len() / (1024 * 1024)
        ));
    }
    let open = || -> Result<ImageReader<std::io::BufReader<std::fs::File>>, String> {
        let reader = ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| format!("cannot read the file: {e}"))?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg) => Ok(reader),
            Some(other) => Err(format!("{other:?} picture: no preview (PNG and JPEG only)")),
            None => Err("not a picture".into()),
        }
    };
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| format!("unreadable picture: {e}"))?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!("{w}×{h}: too large to preview"));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4 + 64 * 1024 * 1024);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("unreadable picture: {e}"))?;
    // `thumbnail` keeps the aspect ratio and uses a fast box filter; a picture
    // smaller than `side` is kept as it is.
    let small = if w > side || h > side {
        img.thumbnail(side, side)
    } else {
        img
    };
    let (data_uri, width, height) = encode(&small)?;
    Ok(Thumb::Image {
        data_uri,
        width,
        height,
        source_width: w,
        source_height: h,
    })
}

/// JPEG for opaque pictures (small), PNG when there is transparency to keep.
fn encode(img: &DynamicImage) -> Result<(String, u32, u32), String> {
    let (w, h) = (img.width(), img.height());
    let mut bytes = Vec::new();
    let mime = if img.color().has_alpha() {
        img.to_rgba8()
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .map_err(|e| format!("cannot encode the preview: {e}"))?;
        "image/png"
    } else {
        let rgb = img.to_rgb8();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 75)
            .encode_image(&rgb)
            .map_err(|e| format!("cannot encode the preview: {e}"))?;
        "image/jpeg"
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok((format!("data:{mime};base64,{b64}"), w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_uri(uri: &str) -> DynamicImage {
        let b64 = uri.split_once(',').unwrap().1;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        image::load_from_memory(&bytes).unwrap()
    }

    #[test]
    fn a_large_png_becomes_a_small_jpeg_of_the_same_colour() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.png");
        image::RgbImage::from_pixel(800, 400, image::Rgb([200, 40, 30]))
            .save(&p)
            .unwrap();
        let Thumb::Image {
            data_uri,
            width,
            height,
            source_width,
            source_height,
        } = from_file(&p, 128)
        else {
            panic!("no thumbnail");
        };
        assert!(data_uri.starts_with("data:image/jpeg;base64,"));
        assert_eq!((width, height), (128, 64));
        assert_eq!((source_width, source_height), (800, 400));
        let img = decode_uri(&data_uri).to_rgb8();
        assert_eq!(img.dimensions(), (128, 64));
        let px = img.get_pixel(64, 32).0;
        for (got, want) in px.iter().zip([200u8, 40, 30]) {
            assert!(got.abs_diff(want) <= 6, "{px:?}");
        }
    }

    #[test]
    fn transparency_is_kept_as_png_and_small_pictures_are_not_enlarged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        image::RgbaImage::from_pixel(20, 30, image::Rgba([0, 0, 255, 100]))
            .save(&p)
            .unwrap();
        match from_file(&p, 128) {
            Thumb::Image {
                data_uri,
                width,
                height,
                ..
            } => {
                assert!(data_uri.starts_with("data:image/png;base64,"));
                assert_eq!((width, height), (20, 30));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_cannot_be_previewed_gets_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a picture at all").unwrap();
        let fake = dir.path().join("fake.png");
        std::fs::write(&fake, "not a picture either").unwrap();
        let gif = dir.path().join("x.gif");
        std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
        let cut = dir.path().join("cut.png");
        let mut png = Vec::new();
        image::RgbImage::from_pixel(50, 50, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
        for (source, want) in [
            ("https://example.com/a.jpg", "remote input"),
            ("HTTP://example.com/a.jpg", "remote input"),
            (
                dir.path().join("missing.png").to_str().unwrap(),
                "file not found",
            ),
            (dir.path().to_str().unwrap(), "not a file"),
            (text.to_str().unwrap(), "not a picture"),
            (fake.to_str().unwrap(), "unreadable picture"),
            (gif.to_str().unwrap(), "Gif picture: no preview"),
            (cut.to_str().unwrap(), "unreadable picture"),
        ] {
            match make(source, 64) {
                Thumb::None { note } => assert!(note.contains(want), "{source}: {note}"),
                other => panic!("{source}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_huge_picture_is_refused_by_its_header() {
        // A PNG announcing 20000×20000 pixels, with one byte of pixel data: refused
        // from the dimensions alone, nothing is decoded.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.png");
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&20000u32.to_be_bytes());
        ihdr.extend_from_slice(&20000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        for chunk in [&b"IDAT\0"[..], &b"IEND"[..]] {
            png.extend_from_slice(&(chunk.len() as u32 - 4).to_be_bytes());
            png.extend_from_slice(chunk);
            png.extend_from_slice(&crc32(chunk).to_be_bytes());
        }
        std::fs::write(&p, &png).unwrap();
        match from_file(&p, 64) {
            Thumb::None { note } => assert!(note.contains("20000×20000"), "{note}"),
            other => panic!("{other:?}"),
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
