"""
The flow timeline (issue 14): what each client did, step by step, so that
an operator can see which step of an OAuth + MCP flow never happened.

  - L{smeldr_oauth.flows.model}: a L{Step} and the step kinds;
  - L{smeldr_oauth.flows.events}: which log events become steps, and the
    few fields of each that are kept (never a secret);
  - (the site's hook, L{smeldr_oauth.web.flow_events}, publishes the
    requests no protocol layer reports: discovery, the authorization page,
    401/403;)
  - L{smeldr_oauth.flows.recorder}: a log observer that buffers steps in
    memory and writes them in batches, off the request path;
  - L{smeldr_oauth.flows.store}: L{IFlowStore<smeldr_oauth.flows.store.IFlowStore>}, the steps in the database (SQLite or
    PostgreSQL, component C{flows}) or in memory, bounded by count and age;
  - L{smeldr_oauth.flows.patterns}: pure recognition of the known failures;
  - L{smeldr_oauth.flows.render}: the timeline as a table or JSON;
  - L{smeldr_oauth.flows.cli}: C{smeldr-oauth-admin flows};
  - L{smeldr_oauth.flows.page}: the operator's page, on the web edge's
    connected-apps page.
"""
