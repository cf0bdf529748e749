// Runs the @kubernetes-models validators (compiled from the CRDs' openAPIV3Schema) on documents.
// Called by check.py from a copy inside .deps/manifests/, so that the packages resolve:
//   node validate.mjs IN.json  ->  prints [{"id": ..., "errors": [...]}] on stdout
// IN.json: [{"id": ..., "module": "<package>/<group>/<version>/<Kind>", "kind": ..., "doc": {...}}]
import { readFileSync } from "node:fs";

const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = [];
for (const item of items) {
  let errors = [];
  try {
    const mod = await import(item.module);
    const Model = mod[item.kind];
    if (typeof Model !== "function") {
      errors = [`${item.module} exports no model ${item.kind}`];
    } else {
      new Model(item.doc).validate();
    }
  } catch (e) {
    const list = Array.isArray(e?.errors) ? e.errors : null;
    const allowed = (x) => (x.params?.allowedValues ? ` (${x.params.allowedValues.join(", ")})` : "");
    errors = list && list.length
      ? list.map((x) => `${x.instancePath || "/"} ${x.message}${allowed(x)}`)
      : [String(e?.message ?? e)];
  }
  results.push({ id: item.id, errors });
}
process.stdout.write(JSON.stringify(results));
