//! Storage dtypes and exact conversions between them.

use half::{bf16, f16};

/// Element types a checkpoint may store. Only the ones fp4 reads are listed; anything else is
/// reported by name through [`DType::from_safetensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
    U8,
    I64,
    I32,
}

impl DType {
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F8_E4M3 => DType::F8E4M3,
            S::U8 => DType::U8,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::U8 => "U8",
            DType::I64 => "I64",
            DType::I32 => "I32",
        }
    }

    /// Whether [`to_f32`] can convert this dtype exactly.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Converts little-endian float bytes to f32 (exact for all three types). Returns `None` for
/// non-float dtypes.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => {
            bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        DType::F16 => {
            bytes.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        _ => return None,
    };
    Some(out)
}

/// Encodes f32 values as little-endian bytes of a float dtype (round to nearest even), the
/// inverse of [`to_f32`]. Returns `None` for non-float dtypes.
pub fn from_f32(dtype: DType, values: &[f32]) -> Option<Vec<u8>> {
    let out = match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()).collect(),
        _ => return None,
    };
    Some(out)
}

/// Rounds an f32 to the nearest bf16 (ties to even), returned as f32. This is what a torch
/// `.to(torch.bfloat16)` does.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_f32_inverts_to_f32() {
        let v = [1.5f32, -0.375, 0.0078125, 256.0];
        for d in [DType::F32, DType::BF16, DType::F16] {
            let back = to_f32(d, &from_f32(d, &v).unwrap()).unwrap();
            assert_eq!(back, v.to_vec(), "{d}");
        }
        assert_eq!(to_f32(DType::BF16, &from_f32(DType::BF16, &[1.0 + 1.0 / 256.0]).unwrap()).unwrap(), vec![1.0]);
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly half-way between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is half-way between 1+2^-7 and 1+2^-6: even is 1+2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
    }

    #[test]
    fn float_conversions_are_exact() {
        let v = [1.5f32, -2.25, 65504.0];
        let bytes: Vec<u8> = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        assert_eq!(to_f32(DType::F16, &bytes).unwrap(), v);
        let bytes: Vec<u8> = v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        assert_eq!(to_f32(DType::BF16, &bytes).unwrap(), vec![1.5, -2.25, 65536.0]);
        assert!(to_f32(DType::U8, &[1, 2]).is_none());
    }
}
