//! Checks of uploaded files: PNG only (by content, not by name), at most so many bytes and
//! pixels, and label ids within the model's range. Every error names the upload field and the
//! problem.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageFormat};

use crate::WebError;

/// Upload limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted file, in bytes.
    pub max_bytes: usize,
    /// Largest accepted width and height, in pixels.
    pub max_side: u32,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// What a file that is not a PNG looks like, for the error message.
fn sniff(bytes: &[u8]) -> &'static str {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => "a JPEG image",
        Ok(ImageFormat::Gif) => "a GIF image",
        Ok(ImageFormat::WebP) => "a WebP image",
        Ok(ImageFormat::Bmp) => "a BMP image",
        Ok(ImageFormat::Tiff) => "a TIFF image",
        Ok(_) => "another image format",
        Err(_) if std::str::from_utf8(&bytes[..bytes.len().min(512)]).is_ok() => "text",
        Err(_) => "an unknown format",
    }
}

/// Decodes an uploaded PNG after checking its size, type and dimensions. `field` names the
/// upload in errors.
pub fn decode_png(field: &str, bytes: &[u8], limits: Limits) -> Result<DynamicImage, WebError> {
    let bad = |msg: String| WebError::BadRequest(format!("{field}: {msg}"));
    if bytes.is_empty() {
        return Err(bad("the upload is empty".into()));
    }
    if bytes.len() > limits.max_bytes {
        return Err(bad(format!(
            "the file is too large: {} bytes, the limit is {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    if !bytes.starts_with(PNG_MAGIC) {
        return Err(bad(format!(
            "not a PNG file (it looks like {}); upload a PNG",
            sniff(bytes)
        )));
    }
    let reader = || image::ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png);
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read the PNG header: {e}")))?;
    if w > limits.max_side || h > limits.max_side {
        return Err(bad(format!(
            "the image is too large: {w}x{h} pixels (WxH), the limit is {m}x{m}",
            m = limits.max_side
        )));
    }
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is empty ({w}x{h} pixels)")));
    }
    let mut r = reader();
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    r.limits(lim);
    r.decode()
        .map_err(|e| bad(format!("cannot decode the PNG: {e}")))
}

/// Decodes an uploaded label map (ids as `taming sample --segmentation` reads them) and checks
/// every id against `n_labels`.
pub fn decode_labels(
    field: &str,
    bytes: &[u8],
    limits: Limits,
    n_labels: usize,
) -> Result<GrayImage, WebError> {
    let labels = taming::image_io::labels_from_image(decode_png(field, bytes, limits)?);
    check_labels(field, &labels, n_labels)?;
    Ok(labels)
}

/// Checks that every label id is below `n_labels`; the error names the first bad id and pixel.
pub fn check_labels(field: &str, labels: &GrayImage, n_labels: usize) -> Result<(), WebError> {
    let w = labels.width() as usize;
    if let Some((i, &id)) = labels
        .as_raw()
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= n_labels)
    {
        return Err(WebError::BadRequest(format!(
            "{field}: label id {id} at pixel (x={}, y={}) is out of range: the model has {n_labels} \
             labels (ids 0..={})",
            i % w.max(1),
            i / w.max(1),
            n_labels.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Encodes an image as PNG bytes.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, WebError> {
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
        .map_err(|e| WebError::Internal(format!("cannot encode a PNG: {e}")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        max_bytes: 10_000,
        max_side: 64,
    };

    fn png(w: u32, h: u32, v: u8) -> Vec<u8> {
        encode_png(&DynamicImage::ImageLuma8(GrayImage::from_pixel(
            w,
            h,
            image::Luma([v]),
        )))
        .unwrap()
    }

    #[test]
    fn checks_type_size_dimensions_and_ids() {
        let e = decode_png("labels", b"hello", LIM).unwrap_err().to_string();
        assert!(e.contains("labels: not a PNG") && e.contains("text"), "{e}");
        let e = decode_png("labels", b"\xff\xd8\xff\xe0\0\x10JFIF", LIM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("JPEG"), "{e}");
        let e = decode_png("image", &vec![0u8; 20_000], LIM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large: 20000 bytes"), "{e}");
        let e = decode_png("image", &png(65, 8, 0), LIM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("65x8"), "{e}");
        let e = decode_labels("labels", &png(4, 4, 9), LIM, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label id 9") && e.contains("8 labels"), "{e}");
        assert_eq!(
            decode_labels("labels", &png(4, 4, 7), LIM, 8)
                .unwrap()
                .width(),
            4
        );
    }
}
