"""Where rendered token ids run: the backend interface (``base``), in process (``local``) or on a server (``server``)."""
