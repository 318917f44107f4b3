// Log in: check the key against the API before keeping it, then go back to the page that asked.
"use strict";
(() => {
  const { api, setKey, showError } = Distill;
  document.getElementById("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = document.getElementById("api-key").value.trim();
    try {
      await api("/v1/jobs?limit=1", { key });
      setKey(key);
      const next = new URLSearchParams(location.search).get("next") || "/ui/";
      location.href = next.startsWith("/ui/") && !next.startsWith("/ui/login") ? next : "/ui/";
    } catch (err) {
      showError("login-error", err.status === 401 ? "That key was not accepted (unauthorized)." : err);
    }
  });
})();
