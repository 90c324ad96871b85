"""The ``penwatch demo`` training run and the OpenTelemetry SDK set-up of the CLI.

Application code, not library code: this is the only place in penwatch that configures
the OpenTelemetry SDK (see ``_tracing.py``).
"""
