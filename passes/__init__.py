"""Graph passes: FX capture of transformer blocks, residual-branch analysis, specialisation."""
