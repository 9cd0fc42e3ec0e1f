"""The ``detrkit`` command line."""
