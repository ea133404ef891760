"""WeatherMixer: the MLP-Mixer weather model, parallel-agnostic (layers come from parallel/).

``config`` (ModelConfig, presets), ``model`` (WeatherMixer), ``counts`` (exact parameter and
FLOP counts for TFLOP/s and MFU), ``loss`` and ``metrics``.
"""
