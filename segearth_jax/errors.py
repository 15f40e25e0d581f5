"""Errors a user can fix. The command line prints them as one line, without a traceback."""


class UserError(Exception):
  """Bad input, argument or file. The message names the file, the record and the field where known."""
