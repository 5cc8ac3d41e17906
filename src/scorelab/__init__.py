"""scorelab: score-based generative models (DDPM, NCSN, VE/VP/sub-VP SDEs) with exact-reference tests."""

__version__ = "0.1.0"
