// API Management in front of the gateway: Entra token check, coarse per-subscription limits, the
// function key, correlation ids. The function stays the authority on identity, quotas and cost.
param name string
param location string
param tags object = {}
@allowed(['Developer', 'BasicV2', 'StandardV2', 'Standard', 'Premium'])
param skuName string = 'StandardV2'
param skuCapacity int = 1
@description('Log Analytics workspace for the gateway log; empty for none.')
param workspaceId string = ''
param publisherEmail string
param publisherName string
param identityId string
param identityClientId string
param functionAppName string
param appInsightsId string
param appInsightsConnectionString string

@description('Entra tenant ids whose tokens are accepted (AUTH_TENANT_IDS, as a list).')
@minLength(1)
param tenantIds array
@description('Exact issuers trusted besides the tenants\' own (AUTH_EXTRA_ISSUERS, as a list), e.g. a sovereign cloud.')
param extraIssuers array = []
@description('OpenID configuration whose keys sign the tokens (AUTH_OPENID_CONFIG_URL); empty: each tenant\'s, public cloud.')
param openIdConfigUrl string = ''
@description('The gateway app ID URI (v1 tokens carry it as aud).')
param audience string
@description('The gateway app registration client id (v2 tokens carry it as aud).')
param audienceClientId string
@description('"*" or a comma-separated list of client application ids allowed to call.')
param allowedClientAppIds string = '*'
param rateLimitCalls int = 600
param rateLimitPeriodSeconds int = 60
param quotaCalls int = 200000
param quotaPeriodSeconds int = 86400

resource functionApp 'Microsoft.Web/sites@2024-11-01' existing = {
  name: functionAppName
}

var classicTlsSettings = {
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls11': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls10': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Tls11': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Backend.Protocols.Ssl30': 'False'
  'Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Ciphers.TripleDes168': 'False'
}

resource apim 'Microsoft.ApiManagement/service@2024-05-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: skuName
    capacity: skuCapacity
  }
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    publisherEmail: publisherEmail
    publisherName: publisherName
    publicNetworkAccess: 'Enabled'
    virtualNetworkType: 'None'
    // Protocol and cipher settings exist on the classic tiers only; a v2 tier refuses them (TLS 1.2+ there).
    customProperties: classicTier ? classicTlsSettings : {}
  }
}

var plainNamedValues = {
  'gw-audience': audience
  'gw-audience-client-id': audienceClientId
  'gw-allowed-client-app-ids': allowedClientAppIds
  'gw-rate-limit-calls': string(rateLimitCalls)
  'gw-rate-limit-period': string(rateLimitPeriodSeconds)
  'gw-quota-calls': string(quotaCalls)
  'gw-quota-period': string(quotaPeriodSeconds)
}

resource namedValues 'Microsoft.ApiManagement/service/namedValues@2024-05-01' = [for item in items(plainNamedValues): {
  parent: apim
  name: item.key
  properties: {
    displayName: item.key
    value: item.value
    secret: false
  }
}]

// The default host key, read at deployment time and stored only as a secret named value (never an
// output). Rotation: regenerate the key, then redeploy (docs/runbook.md). The function app must already
// run code for the host key API to answer, which is why deploy.sh publishes before deploying APIM.
resource functionKey 'Microsoft.ApiManagement/service/namedValues@2024-05-01' = {
  parent: apim
  name: 'gw-function-key'
  properties: {
    displayName: 'gw-function-key'
    secret: true
    value: listKeys('${functionApp.id}/host/default', '2024-11-01').functionKeys.default
  }
}

resource logger 'Microsoft.ApiManagement/service/loggers@2024-05-01' = {
  parent: apim
  name: 'appinsights'
  properties: {
    loggerType: 'applicationInsights'
    resourceId: appInsightsId
    // Entra (managed identity) ingestion: App Insights has local auth disabled.
    credentials: {
      connectionString: appInsightsConnectionString
      identityClientId: identityClientId
    }
  }
}

resource api 'Microsoft.ApiManagement/service/apis@2024-05-01' = {
  parent: apim
  name: 'ai-gateway'
  properties: {
    displayName: 'AI Gateway (OpenAI-compatible)'
    path: 'ai'
    protocols: ['https']
    serviceUrl: 'https://${functionApp.properties.defaultHostName}/api'
    subscriptionRequired: true
    apiType: 'http'
  }
  dependsOn: [namedValues, functionKey]
}

// One operation per method and route callers use; templates are relative to the API path ('ai') and land on
// serviceUrl + template, i.e. the function's own route (host.json routePrefix "" + "api/..."). Query strings
// (api-version, ?caller=...) are not in the templates: APIM forwards them as sent, and a template query
// parameter would become a required one. stream: the route may answer Server-Sent Events, so its operation
// takes chat-stream.xml (unbuffered). Deliberately not published: /admin/* (limits, the spend dashboard and
// the report routes it reads), reached on the function app itself; docs/adr/0006-apim-front-door.md says
// why and tests/unit/test_apim_operations.py lists them, failing on any route that is in neither place.
var operations = [
  { name: 'chat-completions', method: 'POST', urlTemplate: '/v1/chat/completions', templateParameters: [], stream: true, displayName: 'Create chat completion' }
  { name: 'embeddings', method: 'POST', urlTemplate: '/v1/embeddings', templateParameters: [], stream: false, displayName: 'Create embeddings' }
  { name: 'responses', method: 'POST', urlTemplate: '/v1/responses', templateParameters: [], stream: true, displayName: 'Create response (Responses API)' }
  { name: 'get-response', method: 'GET', urlTemplate: '/v1/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Retrieve a stored response' }
  { name: 'delete-response', method: 'DELETE', urlTemplate: '/v1/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Delete a stored response' }
  { name: 'messages', method: 'POST', urlTemplate: '/v1/messages', templateParameters: [], stream: true, displayName: 'Create message (Anthropic Messages)' }
  { name: 'count-tokens', method: 'POST', urlTemplate: '/v1/messages/count_tokens', templateParameters: [], stream: false, displayName: 'Count message tokens' }
  { name: 'list-models', method: 'GET', urlTemplate: '/v1/models', templateParameters: [], stream: false, displayName: 'List models' }
  { name: 'retrieve-model', method: 'GET', urlTemplate: '/v1/models/{model}', templateParameters: [{ name: 'model', type: 'string', required: true }], stream: false, displayName: 'Retrieve a model' }
  { name: 'azure-chat-completions', method: 'POST', urlTemplate: '/openai/deployments/{deployment}/chat/completions', templateParameters: [{ name: 'deployment', type: 'string', required: true }], stream: true, displayName: 'Create chat completion (Azure OpenAI deployment path)' }
  { name: 'azure-embeddings', method: 'POST', urlTemplate: '/openai/deployments/{deployment}/embeddings', templateParameters: [{ name: 'deployment', type: 'string', required: true }], stream: false, displayName: 'Create embeddings (Azure OpenAI deployment path)' }
  { name: 'azure-v1-chat-completions', method: 'POST', urlTemplate: '/openai/v1/chat/completions', templateParameters: [], stream: true, displayName: 'Create chat completion (Azure OpenAI v1 path)' }
  { name: 'azure-v1-embeddings', method: 'POST', urlTemplate: '/openai/v1/embeddings', templateParameters: [], stream: false, displayName: 'Create embeddings (Azure OpenAI v1 path)' }
  { name: 'azure-v1-responses', method: 'POST', urlTemplate: '/openai/v1/responses', templateParameters: [], stream: true, displayName: 'Create a response (Azure OpenAI v1 path)' }
  { name: 'azure-responses', method: 'POST', urlTemplate: '/openai/responses', templateParameters: [], stream: true, displayName: 'Create a response (Azure OpenAI preview path)' }
  { name: 'azure-v1-get-response', method: 'GET', urlTemplate: '/openai/v1/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Retrieve a stored response (Azure OpenAI v1 path)' }
  { name: 'azure-v1-delete-response', method: 'DELETE', urlTemplate: '/openai/v1/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Delete a stored response (Azure OpenAI v1 path)' }
  { name: 'azure-get-response', method: 'GET', urlTemplate: '/openai/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Retrieve a stored response (Azure OpenAI preview path)' }
  { name: 'azure-delete-response', method: 'DELETE', urlTemplate: '/openai/responses/{response_id}', templateParameters: [{ name: 'response_id', type: 'string', required: true }], stream: false, displayName: 'Delete a stored response (Azure OpenAI preview path)' }
  { name: 'generate', method: 'POST', urlTemplate: '/generate', templateParameters: [], stream: false, displayName: 'Generate (task-routed)' }
  { name: 'usage', method: 'GET', urlTemplate: '/v1/usage', templateParameters: [], stream: false, displayName: 'Usage and remaining budget' }
  { name: 'health', method: 'GET', urlTemplate: '/health', templateParameters: [], stream: false, displayName: 'Health' }
]

// templateParameters: APIM refuses a template whose {parameters} the operation does not define.
resource ops 'Microsoft.ApiManagement/service/apis/operations@2024-05-01' = [for op in operations: {
  parent: api
  name: op.name
  properties: {
    displayName: op.displayName
    method: op.method
    urlTemplate: op.urlTemplate
    templateParameters: op.templateParameters
  }
}]

// The API policy with the trusted issuers written in: validate-jwt takes one <openid-config> per key source
// and lists issuers as elements, which named values cannot expand to. The sets are the function's
// (gateway_lib/auth.py): each tenant's v1 and v2 issuers plus the extra ones, and the keys of
// AUTH_OPENID_CONFIG_URL when it is set (a sovereign cloud), else each tenant's public-cloud keys.
// Loops, not lambdas, because checkov's Bicep parser cannot read lambdas; an empty entry (a stray comma in
// authTenantIds or authExtraIssuers) adds nothing.
var tenantOpenIdConfigs = [for t in tenantIds: empty(t) ? '' : '<openid-config url="https://login.microsoftonline.com/${t}/v2.0/.well-known/openid-configuration" />']
var tenantIssuers = [for t in tenantIds: empty(t) ? '' : '<issuer>https://sts.windows.net/${t}/</issuer><issuer>https://login.microsoftonline.com/${t}/v2.0</issuer>']
var extraIssuerElements = [for i in extraIssuers: empty(i) ? '' : '<issuer>${i}</issuer>']
var openIdConfigs = empty(openIdConfigUrl) ? join(tenantOpenIdConfigs, '') : '<openid-config url="${openIdConfigUrl}" />'
var issuers = '${join(tenantIssuers, '')}${join(extraIssuerElements, '')}'
// quota-by-key exists on the classic tiers only (Developer, Basic, Standard, Premium); a v2 tier would refuse
// the policy. There the gateway's own Table Storage quotas are the long-window limit.
var classicTier = !endsWith(toLower(skuName), 'v2')
var quotaPolicy = classicTier ? '<quota-by-key calls="{{gw-quota-calls}}" renewal-period="{{gw-quota-period}}" counter-key=\'@(context.Subscription?.Id ?? context.Request.IpAddress)\' />' : ''
var apiPolicyXml = replace(replace(replace(loadTextContent('../apim/policies/api.xml'), '<!-- gw:openid-configs -->', openIdConfigs), '<!-- gw:issuers -->', issuers), '<!-- gw:quota (quota-by-key on the classic tiers only: the v2 tiers do not have it) -->', quotaPolicy)

resource apiPolicy 'Microsoft.ApiManagement/service/apis/policies@2024-05-01' = {
  parent: api
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: apiPolicyXml
  }
}

resource healthOperation 'Microsoft.ApiManagement/service/apis/operations@2024-05-01' existing = {
  parent: api
  name: 'health'
}

// Every operation that may stream Server-Sent Events forwards unbuffered (chat-stream.xml says why); its
// inbound keeps <base />, so the API policy (validate-jwt, limits, function key) runs first as everywhere.
// `if(` without a space: checkov's Bicep parser reads a loop's condition only in that spelling.
var streamPolicyXml = loadTextContent('../apim/policies/chat-stream.xml')

resource streamPolicies 'Microsoft.ApiManagement/service/apis/operations/policies@2024-05-01' = [for (op, i) in operations: if(op.stream) {
  parent: ops[i]
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: streamPolicyXml
  }
}]

resource healthPolicy 'Microsoft.ApiManagement/service/apis/operations/policies@2024-05-01' = {
  parent: healthOperation
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: loadTextContent('../apim/policies/health.xml')
  }
  dependsOn: [ops]
}

// Request logging without bodies: 0 body bytes everywhere. Logging a response body makes APIM buffer it,
// which would break SSE streaming of chat completions; and prompts/completions never belong in logs.
resource diagnostics 'Microsoft.ApiManagement/service/apis/diagnostics@2024-05-01' = {
  parent: api
  name: 'applicationinsights'
  properties: {
    loggerId: logger.id
    alwaysLog: 'allErrors'
    httpCorrelationProtocol: 'W3C'
    verbosity: 'information'
    logClientIp: false
    sampling: {
      samplingType: 'fixed'
      percentage: 100
    }
    frontend: {
      request: { headers: ['x-request-id'], body: { bytes: 0 } }
      response: { headers: ['x-request-id'], body: { bytes: 0 } }
    }
    backend: {
      request: { headers: ['x-request-id'], body: { bytes: 0 } }
      response: { headers: ['x-request-id'], body: { bytes: 0 } }
    }
  }
}

// APIM's gateway log to Log Analytics (request metadata; bodies are not logged: the API's diagnostic
// keeps 0 bytes of them).
resource gatewayLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(workspaceId)) {
  name: 'gateway-to-log-analytics'
  scope: apim
  properties: {
    workspaceId: workspaceId
    logs: [
      { category: 'GatewayLogs', enabled: true }
    ]
  }
}

output name string = apim.name
output gatewayUrl string = apim.properties.gatewayUrl
output apiBaseUrl string = '${apim.properties.gatewayUrl}/ai'
