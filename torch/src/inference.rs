//! Sliding-window inference over whole volumes (MONAI `sliding_window_inference`): the
//! tiling and Gaussian weights of [`meduet_stages::segmentation::sliding`], windows run in
//! batches, predictions blended by the weights and divided by their sum.
//!
//! The prediction may live on a finer grid than the input by an integer `scale` (UNETR:
//! latent windows of 24³ give logits on the 96³ image grid): window origin `o` on the input
//! grid writes output voxels `o*scale ..`, and the Gaussian map is built at the output
//! window size.

use meduet_stages::segmentation::sliding::{gaussian_importance, pad_to_window, window_starts};
use tch::{Device, Kind, Tensor};

/// Window size, overlap, batching and blending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// Window on the input grid.
    pub roi: [i64; 3],
    pub overlap: f64,
    /// Windows per predictor call.
    pub batch: usize,
    /// Output voxels per input voxel.
    pub scale: i64,
    /// Gaussian sigma as a fraction of the window (0.125).
    pub sigma_scale: f64,
}

/// Runs `predict` (`[n, C, roi] -> [n, K, roi * scale]`) over `x` (`[1, C, X, Y, Z]`) and
/// returns the blended prediction `[1, K, X * scale, Y * scale, Z * scale]` (float32, on `x`'s
/// device) and the number of windows.
pub fn sliding_window(
    x: &Tensor,
    sw: &SlidingWindow,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor, String>,
) -> Result<(Tensor, usize), String> {
    let size = x.size();
    if size.len() != 5 || size[0] != 1 {
        return Err(format!(
            "sliding window: input must be [1, C, X, Y, Z], got {size:?}"
        ));
    }
    let shape = [size[2] as usize, size[3] as usize, size[4] as usize];
    let roi = sw.roi.map(|r| r as usize);
    let pad = pad_to_window(shape, roi);
    let padded = if pad.iter().any(|&(a, b)| a + b > 0) {
        // F.pad order: last axis first.
        x.constant_pad_nd([
            pad[2].0 as i64,
            pad[2].1 as i64,
            pad[1].0 as i64,
            pad[1].1 as i64,
            pad[0].0 as i64,
            pad[0].1 as i64,
        ])
    } else {
        x.shallow_clone()
    };
    let pshape: [usize; 3] = std::array::from_fn(|a| shape[a] + pad[a].0 + pad[a].1);
    let starts = window_starts(pshape, roi, sw.overlap);
    let s = sw.scale;
    let oroi = sw.roi.map(|r| r * s);
    let dev: Device = x.device();
    let w = Tensor::from_slice(&gaussian_importance(
        oroi.map(|r| r as usize),
        sw.sigma_scale,
    ))
    .view([1, 1, oroi[0], oroi[1], oroi[2]])
    .to_device(dev);
    let oshape = pshape.map(|n| n as i64 * s);
    let mut acc: Option<Tensor> = None;
    let norm = Tensor::zeros([1, 1, oshape[0], oshape[1], oshape[2]], (Kind::Float, dev));
    for chunk in starts.chunks(sw.batch.max(1)) {
        let crops: Vec<Tensor> = chunk
            .iter()
            .map(|o| {
                padded
                    .narrow(2, o[0] as i64, sw.roi[0])
                    .narrow(3, o[1] as i64, sw.roi[1])
                    .narrow(4, o[2] as i64, sw.roi[2])
            })
            .collect();
        let batch = Tensor::cat(&crops, 0);
        let pred = predict(&batch)?.to_kind(Kind::Float);
        let ps = pred.size();
        if ps.len() != 5 || ps[0] != chunk.len() as i64 || ps[2..] != oroi {
            return Err(format!(
                "sliding window: the predictor returned {ps:?} for {} windows of {:?} (expected [n, K, {:?}])",
                chunk.len(),
                sw.roi,
                oroi
            ));
        }
        let acc = acc.get_or_insert_with(|| {
            Tensor::zeros(
                [1, ps[1], oshape[0], oshape[1], oshape[2]],
                (Kind::Float, dev),
            )
        });
        let weighted = &pred * &w;
        for (i, o) in chunk.iter().enumerate() {
            let o = o.map(|v| v as i64 * s);
            let mut a = acc
                .narrow(2, o[0], oroi[0])
                .narrow(3, o[1], oroi[1])
                .narrow(4, o[2], oroi[2]);
            a += weighted.get(i as i64).unsqueeze(0);
            let mut n = norm
                .narrow(2, o[0], oroi[0])
                .narrow(3, o[1], oroi[1])
                .narrow(4, o[2], oroi[2]);
            n += &w;
        }
    }
    let out = acc.ok_or("sliding window: no windows")? / norm;
    // Crop the padding away.
    let out = out
        .narrow(2, pad[0].0 as i64 * s, shape[0] as i64 * s)
        .narrow(3, pad[1].0 as i64 * s, shape[1] as i64 * s)
        .narrow(4, pad[2].0 as i64 * s, shape[2] as i64 * s)
        .contiguous();
    Ok((out, starts.len()))
}
