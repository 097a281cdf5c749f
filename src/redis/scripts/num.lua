-- Prepended to every script that reads a stored number: num(s) is the
-- number if s is a plain decimal version (digits only, at most 18 of them,
-- so that HINCRBY and Lua's doubles handle it exactly enough), else nil.
-- Every script validates every number it reads *before its first write*
-- (Lua scripts are not rolled back) and otherwise refuses with
-- {-3, what, found}, which the client turns into a Codec error naming the
-- key.
local function num(s)
  if type(s) == 'string' and #s > 0 and #s <= 18 and not string.find(s, '%D') then
    return tonumber(s)
  end
  return nil
end
