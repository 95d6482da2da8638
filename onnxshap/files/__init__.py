"""Files: bounded reads (``read``) and safe, atomic writes (``write``). Imports nothing above ``errors``."""
