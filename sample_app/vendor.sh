#!/bin/sh
# Copy the browser builds the dashboard uses from node_modules/ into static/vendor/.
# Run from the repository root: npm ci && npm run vendor  (versions: package.json).
set -eu
src=node_modules
dst=sample_app/static/vendor
mkdir -p "$dst/socket.io-client" "$dst/uplot"
cp "$src/socket.io-client/dist/socket.io.min.js" "$src/socket.io-client/dist/socket.io.min.js.map" \
   "$src/socket.io-client/LICENSE" "$dst/socket.io-client/"
# socket.io.min.js bundles these packages; keep their licences beside it
for pkg in engine.io-client engine.io-parser socket.io-parser @socket.io/component-emitter; do
    version=$(node -p "require('./$src/$pkg/package.json').version")
    printf '%s %s\n\n' "$pkg" "$version"
    cat "$src/$pkg/LICENSE"
    printf '\n\n'
done > "$dst/socket.io-client/LICENSE.bundled"
cp "$src/uplot/dist/uPlot.iife.min.js" "$src/uplot/dist/uPlot.min.css" "$src/uplot/LICENSE" "$dst/uplot/"
echo "vendored socket.io-client $(node -p "require('./$src/socket.io-client/package.json').version")" \
     "and uplot $(node -p "require('./$src/uplot/package.json').version") into $dst"
