"""Plain nn.Modules: encoders, quantizer, decoders, teacher, losses."""
