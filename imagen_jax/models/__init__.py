"""Neural networks: the U-Nets of the cascade (base and Efficient U-Net), their building blocks."""
