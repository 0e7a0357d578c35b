"""MLflow plumbing shared by training, evaluation and serving: tracking-URI resolution
(``tracking.uri``) and the gaze model as an MLflow model, logged and resolved again
(``tracking.models``).

It sits below ``training``, ``serving`` and ``evaluation`` (none of which it imports) and
above ``gazeattn``, which never imports it or MLflow.
"""
