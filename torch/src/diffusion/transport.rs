//! SiT's stochastic interpolant with the linear path (upstream SiT `transport/` defaults):
//!
//! ```text
//! x_t = t x_1 + (1 - t) x_0,   x_1 = data, x_0 ~ N(0, I),  t ~ U[0, 1]
//! u_t = x_1 - x_0                                   (velocity target; loss = mean (v - u)^2)
//! score(x, t) = (t v - x) / (1 - t)                 (get_score_from_velocity, linear path)
//! SDE (diffusion form "sigma"): w_t = norm (1 - t)
//!   drift   = v + w_t score
//!   Euler-Maruyama on t = linspace(0, 1 - h, n): x <- x + drift dt + sqrt(2 w_t) sqrt(dt) z
//!   last step "Mean":  x <- x + drift(x, 1 - h) h                 (h = last_step_size 0.04)
//! ODE: dx/dt = v(x, t) on linspace(0, 1, n) (fixed-step Euler or Heun)
//! ```
//!
//! The network receives the continuous `t` directly.

use tch::{Kind, Tensor};

pub use meduet_stages::kinds::diffusion::OdeMethod;

/// A training triple: `t` `[b]`, `x_t`, and the velocity target `u_t`.
pub struct InterpolantSample {
    pub t: Tensor,
    pub xt: Tensor,
    pub ut: Tensor,
}

fn expand_t(t: &Tensor, like: &Tensor) -> Tensor {
    let shape: Vec<i64> = std::iter::once(-1)
        .chain(std::iter::repeat_n(1, like.dim() - 1))
        .collect();
    t.to_kind(like.kind()).view(shape.as_slice())
}

/// `plan(t, x0, x1)`: the interpolant and its velocity for given `t`, noise `x0`, data `x1`.
pub fn interpolate(t: &Tensor, x0: &Tensor, x1: &Tensor) -> InterpolantSample {
    let te = expand_t(t, x1);
    InterpolantSample {
        t: t.shallow_clone(),
        xt: &te * x1 + (te.g_mul_scalar(-1.0) + 1.0) * x0,
        ut: x1 - x0,
    }
}

/// `get_score_from_velocity` for the linear path: `(t v - x) / (1 - t)`.
pub fn score_from_velocity(v: &Tensor, x: &Tensor, t: &Tensor) -> Tensor {
    let te = expand_t(t, x);
    (&te * v - x) / (te.g_mul_scalar(-1.0) + 1.0)
}

/// Euler-Maruyama sampling of the SiT SDE from `init` (noise at t = 0) to data at t = 1.
/// `model(x, t)` returns the velocity; noise comes from libtorch's generator. `steps` time
/// points (`steps - 1` EM steps) plus the "Mean" last step: `steps` model evaluations.
pub fn sample_sde<E>(
    init: &Tensor,
    steps: usize,
    last_step_size: f64,
    diffusion_norm: f64,
    mut model: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, E>,
    mut on_step: impl FnMut(usize) -> Result<(), E>,
) -> Result<Tensor, E> {
    let b = init.size()[0];
    let dev = init.device();
    let t1 = 1.0 - last_step_size;
    let ts: Vec<f64> = (0..steps)
        .map(|i| t1 * i as f64 / (steps - 1) as f64)
        .collect();
    let dt = ts[1] - ts[0];
    let mut drift = |x: &Tensor, t: f64| -> Result<Tensor, E> {
        let tt = Tensor::full([b], t, (Kind::Float, dev));
        let v = model(x, &tt)?;
        let w = diffusion_norm * (1.0 - t);
        Ok(if w == 0.0 {
            v
        } else {
            let s = score_from_velocity(&v, x, &tt);
            v + s * w
        })
    };
    let mut x = init.shallow_clone();
    for (i, &t) in ts[..steps - 1].iter().enumerate() {
        let d = drift(&x, t)?;
        let w = diffusion_norm * (1.0 - t);
        let z = x.randn_like();
        x = &x + d * dt + z * (2.0 * w).sqrt() * dt.sqrt();
        on_step(i + 1)?;
    }
    if last_step_size > 0.0 {
        let d = drift(&x, t1)?;
        x = &x + d * last_step_size;
    }
    on_step(steps)?;
    Ok(x)
}

/// Deterministic sampling of the probability-flow ODE `dx/dt = v(x, t)` from t = 0 to 1 on
/// `steps` evenly spaced time points (Euler: `steps - 1` evaluations; Heun: about twice).
pub fn sample_ode<E>(
    init: &Tensor,
    steps: usize,
    method: OdeMethod,
    mut model: impl FnMut(&Tensor, &Tensor) -> Result<Tensor, E>,
    mut on_step: impl FnMut(usize) -> Result<(), E>,
) -> Result<Tensor, E> {
    let b = init.size()[0];
    let dev = init.device();
    let ts: Vec<f64> = (0..steps).map(|i| i as f64 / (steps - 1) as f64).collect();
    let mut v_at = |x: &Tensor, t: f64| model(x, &Tensor::full([b], t, (Kind::Float, dev)));
    let mut x = init.shallow_clone();
    for i in 0..steps - 1 {
        let (t0, t1) = (ts[i], ts[i + 1]);
        let h = t1 - t0;
        let v0 = v_at(&x, t0)?;
        x = match method {
            OdeMethod::Euler => &x + v0 * h,
            OdeMethod::Heun => {
                let xe = &x + &v0 * h;
                let v1 = v_at(&xe, t1)?;
                &x + (v0 + v1) * (h / 2.0)
            }
        };
        on_step(i + 1)?;
    }
    on_step(steps)?;
    Ok(x)
}
