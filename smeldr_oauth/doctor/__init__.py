"""
C{smeldr-oauth-admin doctor URL}: check a deployment from outside, the way
ChatGPT, Claude.ai and the MCP SDK clients see it.

The package keeps deciding apart from fetching, as the rest of the server
keeps protocol logic apart from HTTP:

  - L{smeldr_oauth.doctor.model}: the records (what a fetch saw, a verdict);
  - L{smeldr_oauth.doctor.discovery}: the URLs clients derive from the one
    the user types, and how they compare resources (pure);
  - L{smeldr_oauth.doctor.checks}: one pure function per check, plain
    values in, a L{Verdict<smeldr_oauth.doctor.model.Verdict>} out;
  - L{smeldr_oauth.doctor.sse}: reading an event stream and judging its
    timing (buffering, proxy timeouts);
  - L{smeldr_oauth.doctor.fetch}: the only module that talks to the
    network (treq, and one TLS handshake for the certificate);
  - L{smeldr_oauth.doctor.flow}: an OAuth flow run with the operator's
    site token, to get a token for the stream and session checks;
  - L{smeldr_oauth.doctor.run}: the order of the checks;
  - L{smeldr_oauth.doctor.report} and L{smeldr_oauth.doctor.cli}: lines,
    JSON, exit status, and the subcommand.
"""
