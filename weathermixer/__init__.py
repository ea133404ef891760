"""WeatherMixer: the MLP-Mixer weather model, parallel-agnostic (layers come from parallel/)."""
