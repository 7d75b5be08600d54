"""Generic quality metrics (SQNR, PSNR, SSIM, Fréchet distance) on arrays, model-free."""
