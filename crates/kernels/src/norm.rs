//! The residual add and RMS norm in front of a matrix product: what
//! `MatMulQ4` with `skip` and `gamma` inputs does before it multiplies (op.rs),
//! in place of a graph's `SkipSimplifiedLayerNormalization`.

/// For each row of `K = gamma.len()` values: `sum = x + skip` and `out = sum /
/// sqrt(mean(sum²) + epsilon) · gamma`. The mean of squares is accumulated in
/// f64 (576 or 1536 terms a row) and the root rounded once to f32; the rest
/// is f32, divided then multiplied as ONNX Runtime's
/// `SkipSimplifiedLayerNormalization` does. Each row on its own, so a row
/// has the same bits in any batch.
///
/// # Panics
/// If the slices' lengths are not `x`'s, or not whole rows of K.
pub fn skip_rms_norm(
    x: &[f32],
    skip: &[f32],
    gamma: &[f32],
    epsilon: f32,
    sum: &mut [f32],
    out: &mut [f32],
) {
    let k = gamma.len();
    assert!(
        k > 0
            && x.len().is_multiple_of(k)
            && [skip.len(), sum.len(), out.len()]
                .iter()
                .all(|&n| n == x.len()),
        "skip_rms_norm: rows of {k}: x {}, skip {}, sum {}, out {}",
        x.len(),
        skip.len(),
        sum.len(),
        out.len()
    );
    for (((x, skip), sum), out) in x
        .chunks_exact(k)
        .zip(skip.chunks_exact(k))
        .zip(sum.chunks_exact_mut(k))
        .zip(out.chunks_exact_mut(k))
    {
        let mut squares = 0f64;
        for ((s, &a), &b) in sum.iter_mut().zip(x).zip(skip) {
            *s = a + b;
            squares += f64::from(*s) * f64::from(*s);
        }
        let rms = (squares / k as f64 + f64::from(epsilon)).sqrt() as f32;
        for ((o, &s), &g) in out.iter_mut().zip(sum.iter()).zip(gamma) {
            *o = s / rms * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_normalized_like_the_float64_formula_and_the_sum_is_exact() {
        let k = 576;
        let rows = 3;
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let skip: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 11 % 53) as f32 - 26.0) * 0.7)
            .collect();
        let gamma: Vec<f32> = (0..k).map(|i| 0.5 + (i % 9) as f32 * 0.1).collect();
        let (mut sum, mut out) = (vec![0f32; rows * k], vec![0f32; rows * k]);
        skip_rms_norm(&x, &skip, &gamma, 1e-5, &mut sum, &mut out);
        for r in 0..rows {
            let row: Vec<f64> = (0..k)
                .map(|i| f64::from(x[r * k + i] + skip[r * k + i]))
                .collect();
            let rms = (row.iter().map(|v| v * v).sum::<f64>() / k as f64 + 1e-5).sqrt();
            for i in 0..k {
                assert_eq!(sum[r * k + i], x[r * k + i] + skip[r * k + i]);
                let want = row[i] / rms * f64::from(gamma[i]);
                let got = f64::from(out[r * k + i]);
                assert!(
                    (got - want).abs() <= want.abs() * 3e-7 + 1e-30,
                    "row {r}, {i}: {got} against {want}"
                );
            }
        }
        // A row alone gives the bits it gives among others.
        let (mut one_sum, mut one) = (vec![0f32; k], vec![0f32; k]);
        skip_rms_norm(
            &x[k..2 * k],
            &skip[k..2 * k],
            &gamma,
            1e-5,
            &mut one_sum,
            &mut one,
        );
        assert_eq!(one, out[k..2 * k]);
    }

    #[test]
    fn a_zero_row_stays_zero() {
        let k = 64;
        let (mut sum, mut out) = (vec![1f32; k], vec![1f32; k]);
        skip_rms_norm(
            &vec![0.0; k],
            &vec![0.0; k],
            &vec![1.0; k],
            1e-6,
            &mut sum,
            &mut out,
        );
        assert!(out.iter().chain(&sum).all(|&v| v == 0.0));
    }
}
