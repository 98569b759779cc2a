//! `image.thumbnail`: decodes a PNG, JPEG, WebP or GIF image (first frame),
//! scales it to fit a box with its aspect ratio kept (never enlarging), and
//! encodes it as PNG, JPEG or WebP. Decoding is bounded by dimension and
//! allocation limits, since inputs are untrusted.

use std::{io::Cursor, sync::Arc, time::Duration};

use bytes::Bytes;
use image::{DynamicImage, ImageDecoder as _, ImageError, ImageFormat, ImageReader, Limits};

use super::{BOTH_MODES, per_byte};
use crate::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

/// Largest width or height of the box.
pub const MAX_BOX: u32 = 4096;
/// Largest decoded width or height accepted.
const MAX_SOURCE_SIDE: u32 = 16384;
/// Largest allocation the decoder may make.
const MAX_DECODE_ALLOC: u64 = 512 << 20;
/// Most pixels a source may have: at 8 bytes a pixel (16-bit RGBA, or a
/// 4-byte output beside a decoder's own 4-byte working buffer, as WebP's
/// lossless decoder keeps) they stay within [`MAX_DECODE_ALLOC`]. Checked
/// from the header, before any pixel buffer exists: fuzzing found a 29-byte
/// WebP whose decoder asked for 666 MB, past the allocation limit.
const MAX_PIXELS: u64 = MAX_DECODE_ALLOC / 8;

/// Adds `image.thumbnail` to `out`.
pub fn register(out: &mut Vec<Arc<dyn Task>>) {
    out.push(Arc::new(ThumbnailTask));
}

struct ThumbnailTask;

// Image decoders parse untrusted input: a worker process by default.
const SPEC: TaskSpec = TaskSpec {
    name: "image.thumbnail",
    cacheable: true,
    version: 1,
    description: "scales a PNG/JPEG/WebP/GIF image to fit a width x height box (aspect kept, never enlarged); output is the encoded image",
    default_mode: Mode::Isolated,
    allowed_modes: BOTH_MODES,
    params: &[
        ParamSpec::required("width", "box width in pixels, 1..=4096"),
        ParamSpec::required("height", "box height in pixels, 1..=4096"),
        ParamSpec::optional("format", "output format: png|jpeg|webp", "png"),
    ],
};

impl Task for ThumbnailTask {
    fn spec(&self) -> &TaskSpec {
        &SPEC
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        let format = match params.choice("format", &["png", "jpeg", "webp"])? {
            "jpeg" => ImageFormat::Jpeg,
            "webp" => ImageFormat::WebP,
            _ => ImageFormat::Png,
        };
        Ok(Box::new(ThumbnailJob {
            width: params.int("width", 1..=MAX_BOX)?,
            height: params.int("height", 1..=MAX_BOX)?,
            format,
        }))
    }
}

struct ThumbnailJob {
    width: u32,
    height: u32,
    format: ImageFormat,
}

impl Job for ThumbnailJob {
    fn estimate(&self, input_len: usize) -> Option<Duration> {
        Some(per_byte(input_len, 40.0))
    }

    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        let source = decode(&input)?;
        ctx.check()?;
        let thumb = if source.width() <= self.width && source.height() <= self.height {
            source
        } else {
            source.thumbnail(self.width, self.height)
        };
        ctx.check()?;
        // JPEG has no alpha; lossless WebP takes 8-bit RGBA.
        let thumb = match self.format {
            ImageFormat::Jpeg => DynamicImage::ImageRgb8(thumb.to_rgb8()),
            ImageFormat::WebP => DynamicImage::ImageRgba8(thumb.to_rgba8()),
            _ => thumb,
        };
        let mut out = Cursor::new(Vec::new());
        thumb
            .write_to(&mut out, self.format)
            .map_err(|e| TaskError::Failed(format!("encoding the thumbnail failed: {e}")))?;
        Ok(Bytes::from(out.into_inner()))
    }
}

fn decode(input: &[u8]) -> Result<DynamicImage, TaskError> {
    let reader = ImageReader::new(Cursor::new(input))
        .with_guessed_format()
        .map_err(|e| TaskError::InvalidInput(format!("could not read the input: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif) => {}
        _ => {
            return Err(TaskError::InvalidInput(
                "input is not a PNG, JPEG, WebP or GIF image (unrecognised signature)".into(),
            ));
        }
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut reader = reader;
    reader.limits(limits);
    let refused = |e| match e {
        ImageError::Limits(l) => TaskError::TooLarge(format!(
            "image exceeds the decoder's limits ({MAX_SOURCE_SIDE}x{MAX_SOURCE_SIDE} pixels, {MAX_PIXELS} pixels in all, {MAX_DECODE_ALLOC} bytes): {l}"
        )),
        other => TaskError::InvalidInput(format!("could not decode the image: {other}")),
    };
    let decoder = reader.into_decoder().map_err(refused)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(TaskError::TooLarge(format!(
            "a {width}x{height} image has more than the {MAX_PIXELS} pixels the decoder accepts"
        )));
    }
    DynamicImage::from_decoder(decoder).map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;
    use image::{Rgba, RgbaImage};

    fn encode(img: &RgbaImage, format: ImageFormat) -> Bytes {
        let img = match format {
            ImageFormat::Jpeg => DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(img.clone()).to_rgb8()),
            _ => DynamicImage::ImageRgba8(img.clone()),
        };
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        Bytes::from(out.into_inner())
    }

    fn thumb(input: Bytes, width: u32, height: u32, format: ImageFormat) -> Result<DynamicImage, TaskError> {
        let ctx = Context::new(None, CancelFlag::new(), None);
        let out = ThumbnailJob { width, height, format }.run(&ctx, input)?;
        let decoded = image::load_from_memory(&out).unwrap();
        assert_eq!(image::guess_format(&out).unwrap(), format);
        Ok(decoded)
    }

    #[test]
    fn fits_the_box_and_keeps_the_aspect_in_every_format() {
        let src = RgbaImage::from_fn(400, 200, |x, y| Rgba([(x % 256) as u8, (y % 256) as u8, 128, 255]));
        for in_fmt in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif] {
            for out_fmt in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
                let t = thumb(encode(&src, in_fmt), 100, 100, out_fmt).unwrap();
                assert_eq!((t.width(), t.height()), (100, 50), "{in_fmt:?} -> {out_fmt:?}");
            }
        }
        // A small image is not enlarged.
        let t = thumb(encode(&src, ImageFormat::Png), 1000, 1000, ImageFormat::Png).unwrap();
        assert_eq!((t.width(), t.height()), (400, 200));
    }

    #[test]
    fn a_header_declaring_too_many_pixels_is_refused_before_decoding() {
        // Found by fuzzing: a 29-byte lossless WebP declaring ~166M pixels.
        let webp = b"RIFF\xc4\x00\x00\x00WEBPVP8L\xb7\x00\x00\x00\x2f\x08\x7a\xf2\x0a\x1a\x0a";
        let err = thumb(Bytes::from_static(webp), 10, 10, ImageFormat::Png).unwrap_err();
        assert!(matches!(err, TaskError::TooLarge(_)), "{err:?}");
        assert!(err.to_string().contains("pixels the decoder accepts"), "{err}");
    }

    #[test]
    fn undecodable_input_is_invalid() {
        let err = thumb(Bytes::from_static(b"hello, not an image"), 10, 10, ImageFormat::Png).unwrap_err();
        assert!(matches!(err, TaskError::InvalidInput(_)), "{err:?}");
        // A PNG signature followed by garbage.
        let mut fake = b"\x89PNG\r\n\x1a\n".to_vec();
        fake.extend_from_slice(&[0xAB; 64]);
        assert!(matches!(thumb(Bytes::from(fake), 10, 10, ImageFormat::Png), Err(TaskError::InvalidInput(_))));
    }
}
