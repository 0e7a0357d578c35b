"""Ray Serve deployment of gaze models: an OpenAI-compatible multimodal chat endpoint.

``serving.app`` holds the deployment (``build_app`` for ``serve build``/``serve deploy``);
``gazeattn`` never imports this package.
"""
